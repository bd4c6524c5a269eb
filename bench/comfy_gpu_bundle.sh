#!/usr/bin/env bash
# Put ComfyUI 0.33.0 and the Python packages the GPU machine lacks into git-ignored folders of this repository, so
# that one device call can run a real ComfyUI API-only (bench/comfy_queue.py). Run it HERE, in the repository root
# of the checkout that the device tool sends:
#
#   bash bench/comfy_gpu_bundle.sh COMFY_GIT_DIR
#
# COMFY_GIT_DIR: the git directory the search tool's `fetch` returns for github:jwijaya83/ComfyUI (or yzkee/ComfyUI),
# e.g. /work/.mirror/jwijaya83+ComfyUI/repo. Writes (both listed in .git/info/exclude, never committed):
#   .whl/                  the reference's wheels (../shared/tools/device_wheels.sh: transformers 5.23.0, diffusers
#                          0.42.1, ...) plus ComfyUI's requirements that the GPU image does not have (list below)
#   .comfy/ComfyUI.tar.xz  ComfyUI's source, without what an API-only server never reads (list below)
# and prints the size that travels (tracked files + both folders; the device limit is 64 MiB).
# On the device: carry [".whl", ".comfy"], install the wheels as the device README says, unpack the source
# (tar -xJf .comfy/ComfyUI.tar.xz -C /tmp) and run bench/comfy_queue.py --comfy /tmp/ComfyUI (bench/README.md).
# To fit, two things travel compressed harder than usual: the source as .tar.xz (8.4 MB -> 1.3 MB) and PyAV's
# wheel re-zipped with LZMA (35 -> 26 MB: the same files and RECORD; pip reads it like any wheel). Re-zipping
# takes a few minutes, once.
#
# Left out, and why that is safe for an API-only run of GLM-Image and the memory test pack:
# - comfyui-frontend-package (the web UI, ~40 MB): the server starts without it when --front-end-root names a folder;
#   comfy_queue.py points it at an empty one. Nothing is served to a browser; /prompt, /history, /object_info and
#   the websocket do not need it.
# - comfyui-workflow-templates, comfyui-embedded-docs: looked up lazily, their absence is logged, nothing else.
# - comfy-kitchen's compiled CUDA and ROCm kernels (_C.abi3.so, 176 + 59 MB unpacked, 57 MB as a wheel): the
#   package imports without them (it marks its cuda backend unavailable and uses its triton/eager ones); they
#   serve fp8/nvfp4 quantised layers and int8 attention, which neither pack uses. The rest of the wheel is kept.
# - kornia, spandrel, PyOpenGL, comfy-angle ("non essential" in ComfyUI's requirements): only some comfy_extras
#   nodes import them (nodes_latent, _upscale_model, _post_processing, _canny, _morphology, _glsl); those log
#   an import failure at start-up and are skipped.
# - ComfyUI's tokenizer data of native text encoders (comfy/text_encoders/*_tokenizer, comfy/sd1_tokenizer:
#   ~13 MB, read only when such a text encoder loads), comfy_api_nodes (the cloud API nodes; the server runs with
#   --disable-api-nodes), blueprints, tests, docs and the fork's own deployment files.
# Not left out: PyAV. 0.33's core LoadImage decodes every image through it, so edit and multi-subject need it.
set -euo pipefail
GITDIR=${1:?usage: bash bench/comfy_gpu_bundle.sh COMFY_GIT_DIR}
top=$(git rev-parse --show-toplevel); cd "$top"
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
for ignored in /.whl/ /.comfy/; do grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >> "$exclude"; done
quiet() { grep -v "^WARNING: Location" >&2 || true; }

# 1. The reference's wheels (transformers, diffusers and their few needs), exactly as the other bench calls use.
DEVICE_WHEELS=${DEVICE_WHEELS:-$top/../shared/tools/device_wheels.sh}
bash "$DEVICE_WHEELS" >/dev/null 2> >(quiet)

# 2. ComfyUI 0.33.0's requirements that the GPU image (KINDS.md's package list) lacks, with their own needs.
#    Pinned to the versions this was checked with; one version of each (two stop the device's install).
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl \
  comfy-aimdo==0.4.13 torchsde==0.2.6 trampoline==0.1.2 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 \
  blake3==1.0.11 simpleeval==1.0.8 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 2> >(quiet)

# Two wheels re-zipped: comfy-kitchen without its compiled kernels (RECORD updated to match), PyAV with LZMA.
repack() {  # NAME==VERSION MODE
  local spec=$1 mode=$2 tmp
  ls .whl/"${spec%%==*}"-"${spec##*==}"-*.whl >/dev/null 2>&1 && return 0
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$spec" 2> >(quiet)
  python3 - "$mode" "$tmp"/*.whl .whl <<'PY'
import sys, zipfile
from pathlib import Path
mode, source, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
dropped = {"comfy_kitchen/backends/cuda/_C.abi3.so", "comfy_kitchen/backends/hip/_C.abi3.so"} if mode == "strip" else set()
method = zipfile.ZIP_LZMA if mode == "lzma" else zipfile.ZIP_DEFLATED
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out_dir / source.name, "w", method) as zout:
    missing = dropped - set(zin.namelist())
    if missing:
        sys.exit(f"{source.name}: {sorted(missing)} not found; the wheel's layout changed, update comfy_gpu_bundle.sh")
    for info in zin.infolist():
        if info.filename in dropped:
            continue
        data = zin.read(info.filename)
        if dropped and info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if line.split(b",")[0].decode() not in dropped)
        zout.writestr(info, data, compress_type=method)
print(f"  {source.name}: {source.stat().st_size / 1e6:.1f} MB -> {(out_dir / source.name).stat().st_size / 1e6:.1f} MB")
PY
  rm -rf "$tmp"
}
repack comfy-kitchen==0.2.31 strip
repack av==19.0.2 lzma

# 3. ComfyUI's source. The snapshot may lack some blobs (seen: llama_tokenizer/tokenizer.json, the SageAttention
#    submodule): archive the paths whose blobs exist, minus what an API-only server never reads.
if [ ! -f .comfy/ComfyUI.tar.xz ]; then
  tmp=$(mktemp -d); mkdir -p "$tmp/ComfyUI" .comfy
  skip=(blueprints comfy_api_nodes tests tests-unit script_examples runpod_worker .github .ci openapi.yaml
        docker-compose.test.yml Dockerfile dockerBuild.sh runComfy install.sh comfy/sd1_tokenizer)
  pathspec=(.)
  for path in "${skip[@]}"; do pathspec+=(":(exclude)$path"); done
  while read -r mode type sha path; do
    if [ "$type" != blob ] || ! git --git-dir="$GITDIR" cat-file -e "$sha" 2>/dev/null \
       || [[ "$path" == comfy/text_encoders/*_tokenizer/* ]]; then pathspec+=(":(exclude)$path"); fi
  done < <(git --git-dir="$GITDIR" ls-tree -r HEAD)
  git --git-dir="$GITDIR" archive HEAD -- "${pathspec[@]}" 2> >(grep -v '^error: invalid object' >&2 || true) \
    | tar -x -C "$tmp/ComfyUI"
  git --git-dir="$GITDIR" log -1 --format='%H %ci %s' HEAD > "$tmp/ComfyUI/.source_commit"
  tar -cJf .comfy/ComfyUI.tar.xz -C "$tmp" ComfyUI
  rm -rf "$tmp"
fi
tar -xJOf .comfy/ComfyUI.tar.xz ComfyUI/comfyui_version.py | grep -o '"[0-9.]*"' | sed 's/^/ComfyUI version /'

# 4. What travels: tracked files + untracked-not-ignored files + the two carried folders.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$( (git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null || true) | tail -1 | cut -f1)
whl=$(du -sb .whl | cut -f1); comfy=$(du -sb .comfy | cut -f1)
python3 - "$tracked" "${untracked:-0}" "$whl" "$comfy" <<'PY'
import sys
tracked, untracked, whl, comfy = map(int, sys.argv[1:])
total = tracked + untracked + whl + comfy
print(f"travels: tracked {tracked / 1e6:.1f} MB + untracked {untracked / 1e6:.1f} MB + .whl {whl / 1e6:.1f} MB"
      f" + .comfy {comfy / 1e6:.1f} MB = {total / 2**20:.1f} MiB of 64 MiB")
sys.exit(0 if total < 64 * 2**20 else "over the device's 64 MiB carry limit")
PY
ls .whl
