"""The peers whose exact output parity tests compare against, at the versions the lock installs.

A peer's next release may change its output (sentence-transformers 6.3.0 changed which negatives
`mine_hard_negatives` returns), so each parity test names the version it holds for and fails with
this message on another one instead of drifting. Upgrading a peer: README, "Upgrading a dependency".
"""

from __future__ import annotations

from importlib.metadata import version

PEER_VERSIONS = {
    "sentence-transformers": "6.3.0",
    "flagembedding": "1.4.2",
    "pytrec-eval-terrier": "0.5.11",
}


def require_peer(dist: str) -> None:
    """Fail unless the installed `dist` is the version this suite's parity figures hold for."""
    want, got = PEER_VERSIONS[dist], version(dist)
    assert got == want, (f"parity with {dist} is checked at {want} (the lock), {got} is installed: "
                         f"re-run the parity tests against it and update tests/peers.py")
