"""Jobs through the containers, from the host, with the SDK (scripts/test-containers).

1. A 3-round job through the gateway container: it succeeds with three rounds (indexes
   0, 1, 2 in the job document) and a best image that is a real PNG.
2. A second 3-round job whose worker container is SIGKILLed while round 2 runs (after
   round 1's checkpoint): the restarted worker resumes it, and it succeeds with each
   round exactly once.

Polls `GET /jobs/{id}` rather than following events, so that it watches the job from the
outside the way an operator would; every wait has a deadline and says what it waited for.

    python tests/containers/drive.py --url http://127.0.0.1:PORT --kill "podman kill -s KILL gcr-ci_worker_1"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import time
from collections.abc import Callable

import gcr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB = {
    # tiny:sd on the CPU makes noise at any size; small and many steps, so a round lasts
    # long enough to be caught in the middle
    "generation": {"width": 64, "height": 64, "steps": 30},
    # threshold 1: nothing is accepted, so the job runs all its rounds
    "loop": {"max_rounds": 3, "threshold": 1.0, "patience": 5},
}


def until(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"FAIL: timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


def wait_ready(client: gcr.Client, timeout_s: float) -> None:
    def ready() -> bool:
        try:
            return client.ready().get("ready") is True
        except gcr.APIConnectionError:
            return False

    until("the gateway's /readyz (a live worker and critic)", ready, timeout_s, every_s=1.0)


def finished(client: gcr.Client, job_id: str, timeout_s: float) -> gcr.JobDocument:
    docs: list[gcr.JobDocument] = []

    def done() -> bool:
        docs.append(client.get(job_id))
        return docs[-1].status in ("succeeded", "failed", "cancelled", "expired")

    until(f"job {job_id} to end", done, timeout_s, every_s=0.5)
    return docs[-1]


def check_three_rounds(client: gcr.Client, doc: gcr.JobDocument) -> None:
    rounds = [r.index for r in doc.rounds]  # 0-based in the job document
    if doc.status != "succeeded" or rounds != [0, 1, 2]:
        raise SystemExit(f"FAIL: job {doc.id} ended {doc.status} ({doc.stop_reason}, {doc.error}) with rounds {rounds}")
    png = client.best_image(doc.id)
    if not png.startswith(PNG_SIGNATURE):
        raise SystemExit(f"FAIL: job {doc.id}'s best image is not a PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the gateway container's published address")
    parser.add_argument("--kill", required=True, help="command that SIGKILLs the worker container")
    parser.add_argument("--restart", help="command that starts it again, if its restart policy does not")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each wait may take")
    args = parser.parse_args()

    with gcr.Client(args.url) as client:
        start = time.monotonic()
        wait_ready(client, args.timeout)
        healthz = client.http.get("/healthz")
        if healthz.status_code != 200:
            raise SystemExit(f"FAIL: the gateway container's /healthz answered {healthz.status_code}")
        print(f"gateway ready after {time.monotonic() - start:.1f} s (/healthz 200, /readyz ready)")

        start = time.monotonic()
        job = client.submit({"prompt": "a red cube on a table", **JOB})
        doc = finished(client, job.id, args.timeout)
        check_three_rounds(client, doc)
        print(f"job 1 ({doc.id}): 3 rounds, best round {doc.best and doc.best.round}, {time.monotonic() - start:.1f} s")

        job = client.submit({"prompt": "a blue sphere in the rain", **JOB})
        until(
            f"job {job.id} to start round 2 (round 1 checkpointed)",
            lambda: len(client.get(job.id).rounds) == 1,
            args.timeout,
            every_s=0.05,
        )
        subprocess.run(shlex.split(args.kill), check=True, capture_output=True)
        killed_during = client.get(job.id)
        done = len(killed_during.rounds)
        print(f"job 2 ({job.id}): worker SIGKILLed with {done} round(s) done, stage {killed_during.stage}")
        if done != 1:
            raise SystemExit("FAIL: the kill did not land while round 2 was running")
        if args.restart:
            subprocess.run(shlex.split(args.restart), check=True, capture_output=True)
        start = time.monotonic()
        doc = finished(client, job.id, args.timeout)
        check_three_rounds(client, doc)
        print(
            f"job 2 ({doc.id}): resumed and succeeded with each of its 3 rounds once, {doc.attempts} claims, "
            f"{time.monotonic() - start:.1f} s after the kill"
        )


if __name__ == "__main__":
    main()
