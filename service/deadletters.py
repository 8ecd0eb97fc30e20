"""``tadpole dead-letters``: list what a pipeline step could not take; have it re-applied.

The running relay and projectors do the re-applying (each owns what it feeds):
``retry`` marks the letters, then shows them being taken until each is
re-applied, fails again, or the wait is over.
"""

from __future__ import annotations

import sys
import time

import orjson

from service.settings import Settings
from service.wiring import open_store
from streaming.deadletters import RETRY, DeadLetters


def list_letters(settings: Settings, stage: str | None, everything: bool, as_json: bool) -> int:
    store = open_store(settings)
    try:
        letters = DeadLetters(store).listing(stage, resolved=everything)
    finally:
        store.close()
    if as_json:
        for letter in letters:
            print(orjson.dumps(letter.as_json()).decode())
        return 0
    if not letters:
        print("no dead letters" + ("" if everything else " waiting to be re-applied"))
        return 0
    print(f"{'id':>6}  {'stage':18} {'state':8} {'tries':>5}  event")
    for d in letters:
        print(
            f"{d.id:>6}  {d.stage:18} {d.state:8} {d.attempts:>5}  {d.event_type} "
            f"{d.aggregate_id} v{d.version} (position {d.position})\n"
            f"{'':8}{d.error}"
        )
    return 0


def retry_letters(settings: Settings, ids: list[int] | None, stage: str | None, wait: float) -> int:
    """Mark letters for re-applying and follow them; 0 when every one was re-applied."""
    store = open_store(settings)
    try:
        letters = DeadLetters(store)
        wanted = {d.id: d for d in letters.unresolved(stage) if ids is None or d.id in ids}
        marked = letters.request_retry(list(wanted), stage)
        if not wanted:
            print("no dead letters to retry")
            return 0
        print(f"asked the running steps to re-apply {marked} dead letters; waiting up to {wait:g}s")
        deadline = time.monotonic() + wait
        pending = dict(wanted)
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)
            now = {d.id: d for d in letters.unresolved(stage)}
            for letter_id, before in list(pending.items()):
                after = now.get(letter_id)
                if after is None:
                    print(f"  {letter_id}: re-applied ({before.event_type} v{before.version})")
                    del pending[letter_id]
                elif after.state != RETRY:
                    print(f"  {letter_id}: failed again: {after.error}")
                    del pending[letter_id]
        for letter_id in pending:
            print(f"  {letter_id}: not taken yet (is the {wanted[letter_id].stage} running?)")
        remaining = letters.unresolved(stage)
    finally:
        store.close()
    failed = [d for d in remaining if d.id in wanted]
    if failed:
        print(f"{len(failed)} of {len(wanted)} still dead-lettered", file=sys.stderr)
        return 1
    print(f"all {len(wanted)} re-applied")
    return 0
