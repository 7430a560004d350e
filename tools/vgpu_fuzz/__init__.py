"""Coverage-guided fuzzing of the back end (atheris, libFuzzer's engine): two entry points, guest commands through
the device (`commands`) and front-end messages through a session (`vhost_user`), with the checks that make a
misbehaviour a failure (`checks`), a replay that needs no atheris (`replay`), the long run and its report (`run`).

    python -m vgpu_fuzz run commands --units 1000000      # fuzz; report into benchmarks/results/fuzz.json
    python -m vgpu_fuzz replay commands DIR|FILE ...      # the same entry point, inputs from files
    python -m vgpu_fuzz seeds                             # rewrite the committed seed corpus
"""
