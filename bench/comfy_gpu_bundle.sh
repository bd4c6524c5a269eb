#!/usr/bin/env bash
# Put ComfyUI 0.33.0 and the Python packages the GPU machine lacks into git-ignored folders of this repository, so
# that one device call can run a real ComfyUI API-only (bench/comfy_queue.py). Run it HERE, in the repository root
# of the checkout that the device tool sends:
#
#   bash bench/comfy_gpu_bundle.sh COMFY_GIT_DIR
#
# COMFY_GIT_DIR: the git directory the search tool's `fetch` returns for github:jwijaya83/ComfyUI (or yzkee/ComfyUI),
# e.g. /work/.mirror/jwijaya83+ComfyUI/repo. Writes (both listed in .git/info/exclude, never committed):
#   .whl/              the reference's wheels (../shared/tools/device_wheels.sh: transformers 5.23.0, diffusers 0.42.1,
#                      ...) plus ComfyUI's requirements that the GPU image does not have (list below)
#   .comfy/ComfyUI/    ComfyUI's source, without what an API-only server never reads (list below)
# and prints the size that travels (tracked files + both folders; the device limit is 64 MiB).
# On the device: carry [".whl", ".comfy"], install the wheels as the device README says, run bench/comfy_queue.py
# with --comfy .comfy/ComfyUI (the exact command is in bench/README.md).
#
# Left out, and why that is safe for an API-only run of GLM-Image and the memory test pack:
# - comfyui-frontend-package (the web UI, ~40 MB): the server starts without it when --front-end-root names a folder;
#   comfy_queue.py points it at an empty one. Nothing is served to a browser; /prompt, /history, /object_info and
#   the websocket do not need it.
# - comfyui-workflow-templates, comfyui-embedded-docs: looked up lazily, their absence is logged, nothing else.
# - av (PyAV, 34 MB with FFmpeg): imported at start-up by comfy_api's video types but only called by video/audio
#   nodes; comfy_queue.py puts bench/comfy_standins/av (placeholders that raise when used) on the server's path.
# - comfy-kitchen's compiled CUDA and ROCm kernels (_C.abi3.so, 176 + 59 MB unpacked, 57 MB as a wheel): the
#   package imports without them (it marks its cuda backend unavailable and uses its triton/eager ones); they
#   serve fp8/nvfp4 quantised layers and int8 attention, which neither pack uses. The rest of the wheel is kept.
# - kornia, spandrel, PyOpenGL, comfy-angle ("non essential" in ComfyUI's requirements): only some comfy_extras
#   nodes import them; those extras log an import failure and are skipped.
# - ComfyUI's tokenizer data of native text encoders (comfy/text_encoders/*_tokenizer, comfy/sd1_tokenizer:
#   ~13 MB, read only when such a text encoder loads), comfy_api_nodes (the cloud API nodes; the server runs with
#   --disable-api-nodes), blueprints, tests, docs and the fork's own deployment files.
set -euo pipefail
GITDIR=${1:?usage: bash bench/comfy_gpu_bundle.sh COMFY_GIT_DIR}
top=$(git rev-parse --show-toplevel); cd "$top"
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
for ignored in /.whl/ /.comfy/; do grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >> "$exclude"; done

# 1. The reference's wheels (transformers, diffusers and their few needs), exactly as the other bench calls use.
DEVICE_WHEELS=${DEVICE_WHEELS:-$top/../shared/tools/device_wheels.sh}
bash "$DEVICE_WHEELS" >/dev/null

# 2. ComfyUI 0.33.0's requirements that the GPU image (KINDS.md's package list) lacks, with their own needs.
#    Pinned to the versions this was checked with; one version of each (two stop the device's install).
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl \
  comfy-aimdo==0.4.13 torchsde==0.2.6 trampoline==0.1.2 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 \
  blake3==1.0.11 simpleeval==1.0.8 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
  2> >(grep -v "^WARNING: Location" >&2)

# comfy-kitchen without its compiled kernels (see above), repacked as a wheel with a matching RECORD.
if ! ls .whl/comfy_kitchen-0.2.31-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" comfy-kitchen==0.2.31 2> >(grep -v "^WARNING: Location" >&2)
  python3 - "$tmp"/comfy_kitchen-0.2.31-*.whl .whl <<'EOF'
import sys, zipfile
from pathlib import Path
source, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
dropped = {"comfy_kitchen/backends/cuda/_C.abi3.so", "comfy_kitchen/backends/hip/_C.abi3.so"}
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out_dir / source.name, "w", zipfile.ZIP_DEFLATED) as zout:
    names = zin.namelist()
    missing = dropped - set(names)
    if missing:
        sys.exit(f"comfy-kitchen wheel layout changed: {sorted(missing)} not found; update comfy_gpu_bundle.sh")
    for name in names:
        if name in dropped:
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if line.split(b",")[0].decode() not in dropped)
        zout.writestr(zin.getinfo(name), data)
print(f"  comfy-kitchen repacked without {sorted(dropped)}")
EOF
  rm -rf "$tmp"
fi

# 3. ComfyUI's source. The snapshot may lack some blobs (seen: llama_tokenizer/tokenizer.json, the SageAttention
#    submodule): archive the paths whose blobs exist, minus what an API-only server never reads.
if [ ! -f .comfy/ComfyUI/main.py ]; then
  mkdir -p .comfy/ComfyUI
  skip=(blueprints comfy_api_nodes tests tests-unit script_examples runpod_worker .github .ci openapi.yaml
        docker-compose.test.yml Dockerfile dockerBuild.sh runComfy install.sh comfy/sd1_tokenizer)
  pathspec=(.)
  for path in "${skip[@]}"; do pathspec+=(":(exclude)$path"); done
  while read -r mode type sha path; do
    if [ "$type" != blob ] || ! git --git-dir="$GITDIR" cat-file -e "$sha" 2>/dev/null \
       || [[ "$path" == comfy/text_encoders/*_tokenizer/* ]]; then pathspec+=(":(exclude)$path"); fi
  done < <(git --git-dir="$GITDIR" ls-tree -r HEAD)
  git --git-dir="$GITDIR" archive HEAD -- "${pathspec[@]}" 2> >(grep -v '^error: invalid object' >&2) \
    | tar -x -C .comfy/ComfyUI
  git --git-dir="$GITDIR" log -1 --format='%H %ci %s' HEAD > .comfy/ComfyUI/.source_commit
fi
grep -o '"[0-9.]*"' .comfy/ComfyUI/comfyui_version.py | sed 's/^/ComfyUI version /'

# 4. What travels: tracked files + untracked-not-ignored files + the two carried folders.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$( (git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null || true) | tail -1 | cut -f1)
whl=$(du -sb .whl | cut -f1); comfy=$(du -sb .comfy | cut -f1)
python3 - "$tracked" "${untracked:-0}" "$whl" "$comfy" <<'EOF'
import sys
tracked, untracked, whl, comfy = map(int, sys.argv[1:])
total = tracked + untracked + whl + comfy
print(f"travels: tracked {tracked / 1e6:.1f} MB + untracked {untracked / 1e6:.1f} MB + .whl {whl / 1e6:.1f} MB"
      f" + .comfy {comfy / 1e6:.1f} MB = {total / 2**20:.1f} MiB of 64 MiB")
sys.exit(0 if total < 64 * 2**20 else "over the device's 64 MiB carry limit")
EOF
ls .whl
