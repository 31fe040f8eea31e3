"""``flower-supernode`` whose idle waits last at most ``--poll`` seconds.

``python deploy/supernode.py --poll 0.1 <flower-supernode arguments>``

Flower 1.41's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps 3 s after every pull
that brought no message, and looks for its ClientApp's reply every 0.5 s. A node that has just
sent its training reply therefore sees the evaluation message that follows up to 3 s late, and the
next round's training message likewise: on loopback, with rounds of some twenty seconds, those
waits are most of what real processes cost over the simulation (benchmarks/scale.py). Flower
has no setting for them; this entry point caps every ``time.sleep`` of that module at ``--poll``
seconds and then runs Flower's own ``flower-supernode`` unchanged. A shorter wait means more pulls
(one every ``--poll`` seconds per idle node), which the SuperLink answers in microseconds on
loopback; a federation of many nodes over a real network should keep Flower's default.

Run it as a file, not with ``-m``: its directory then joins only this process's import path, and
the ClientApps the SuperNode starts import the app from the installed FAB as they always do.
``deploy.launch --supernode-poll SECONDS`` starts its SuperNodes this way.
"""

from __future__ import annotations

import argparse
import sys
import time

import flwr.supernode.start_client_internal as supernode_loop


class CappedSleep:
    """Stands in for the ``time`` module: ``sleep`` waits at most ``cap`` seconds, the rest is ``time``'s."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def check_poll(cap: float, name: str = "--poll") -> None:
    """Refuse a cap outside (0, 3] seconds (Flower's own longest wait is 3 s), naming it ``name``."""
    if not 0 < cap <= 3:
        raise ValueError(f"{name}: got {cap!r}; allowed: seconds in (0, 3] (Flower's own longest wait is 3 s)")


def cap_waits(cap: float) -> None:
    """Make the SuperNode's loop wait at most ``cap`` seconds between its pulls and pushes."""
    check_poll(cap)
    if getattr(supernode_loop, "time", None) is not time:
        raise RuntimeError(f"{supernode_loop.__name__} no longer waits with the time module; this wrapper was "
                           "written for flwr 1.41 and needs a look before it can shorten that version's waits")
    supernode_loop.time = CappedSleep(cap)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--poll", type=float, required=True, help="longest idle wait, in seconds")
    args, rest = parser.parse_known_args(argv)
    cap_waits(args.poll)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
