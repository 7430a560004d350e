# Sourced by tools/test and tools/demo: a venv with the project and its test dependencies, reinstalled only when
# pyproject.toml changes (a stamp holds its hash), so a warm run costs nothing. A cold run says what it does from
# its first second: pip's output is counted into one progress line (a bar on a terminal, a line every few seconds
# in a CI log) by tools/vgpu_lab/progress.py, which needs nothing but the system's python3; the whole of pip's
# output is kept in .venv/pip.log.
if [ ! -x .venv/bin/python ]; then
    echo "venv: creating .venv (python3 -m venv)" >&2
    python3 -m venv .venv
fi
_stamp=".venv/.vgpu-pyproject.sha256"
_want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    : > .venv/pip.log
    if ! (set -o pipefail
          .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]' 2>&1 |
              python3 tools/vgpu_lab/progress.py "venv: pip install -e .[test] (packages)" \
                  --match '^(Collecting|Obtaining) ' --log .venv/pip.log); then
        cat .venv/pip.log
        exit 1
    fi
    echo "$_want" > "$_stamp"
fi
# The lab package (tools/vgpu_lab: provisioning, guest programs, QEMU runs) is not part of the installed product; the
# venv finds it through a .pth file naming this checkout's tools/ folder, written on every run so a moved checkout
# with a fresh venv, or a worktree, always points at its own copy.
.venv/bin/python -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "vgpu-lab.pth").write_text(str(pathlib.Path("tools").resolve()) + "\n")'
