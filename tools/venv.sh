# Sourced by tools/test and tools/demo: a venv with the project and its test dependencies, reinstalled only when
# pyproject.toml changes (a stamp holds its hash), so a warm run costs nothing.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
_stamp=".venv/.vgpu-pyproject.sha256"
_want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' > .venv/pip.log 2>&1; then
        cat .venv/pip.log
        exit 1
    fi
    echo "$_want" > "$_stamp"
fi
# The lab package (tools/vgpu_lab: provisioning, guest programs, QEMU runs) is not part of the installed product; the
# venv finds it through a .pth file naming this checkout's tools/ folder, written on every run so a moved checkout
# with a fresh venv, or a worktree, always points at its own copy.
.venv/bin/python -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "vgpu-lab.pth").write_text(str(pathlib.Path("tools").resolve()) + "\n")'
