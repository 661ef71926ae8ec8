"""Strict typed configs: YAML + --set overrides, unknown keys are errors."""

from dataclasses import dataclass, field

import pytest

from raylib.config import load_config


@dataclass
class Inner:
    lr: float = 1e-4
    dims: list[int] = field(default_factory=list)


@dataclass
class Job:
    name: str = "x"
    steps: int = 1
    use_gpu: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nsteps: 3e6\ninner:\n  lr: 2e-5\n")
    cfg = load_config(Job, path, ["inner.dims=[256, 128]", "use_gpu=true", "steps=7"])
    assert cfg == Job(name="a", steps=7, use_gpu=True, inner=Inner(lr=2e-5, dims=[256, 128]))
    assert load_config(Job, path).steps == 3_000_000


@pytest.mark.parametrize("override,match", [
    (["inner.lrr=1"], "inner.lrr"), (["stepz=1"], "stepz"), (["steps=abc"], "steps"),
    (["use_gpu=maybe"], "use_gpu"), (["nokey"], "key=value"),
])
def test_bad_keys_and_values_are_errors(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(Job, None, override)


def test_peer_versions_are_the_locked_ones():
    """tests/peers.py names the versions the lock installs (a `make lock` that moves a peer fails here)."""
    from pathlib import Path

    from peers import PEER_VERSIONS

    lock = Path(__file__).resolve().parents[1] / "requirements/lock-py311-linux-x86_64.txt"
    pins = dict(line.split("#")[0].strip().split("==") for line in lock.read_text().splitlines()
                if "==" in line)
    assert {d: pins[d] for d in PEER_VERSIONS} == PEER_VERSIONS
