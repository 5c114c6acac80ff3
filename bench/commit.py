"""What a round's commit costs with the run directory in a bucket against a local disk.

One round's commit is what the driver writes after each round: labeled.parquet (every label so
far), summary.json, state.json (the commit point), plus the grown run.log. This times those
writes through ``RunDir`` on a local folder and on a run in the moto S3 server on loopback
(``make s3server`` builds it), side by side in one process, for labelled sets of growing size.

    .venv/bin/python bench/commit.py [--rounds 20] [--labels 1000,10000,100000]
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/select.py would shadow the standard library's `select` for a script run from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asvp_ray.loop.rundir import RunDir  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit(rd: RunDir, n: int, k: int) -> float:
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    rd.write_labeled(ids, ids % 10, ids * 0 + k)
    rd.write_summary({"rounds": [{"round": r, "n_labeled": n, "seconds": {"select": 0.1}} for r in range(k + 1)]})
    with open(rd.log_path, "a") as f:
        f.write(f"round {k}: +{n} labels\n" * 5)
    rd.write_state({"next_round": k + 1, "n_labeled": n})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--labels", default="1000,10000,100000")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("ASVP_LEASE_SETTLE_S", "0.05")
    port = _free_port()
    server = subprocess.Popen([str(ROOT / ".venv-s3" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import pyarrow.fs as pafs

        for _ in range(100):
            try:
                fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                       allow_bucket_creation=True)
                fs.create_dir("bench")
                break
            except OSError:
                time.sleep(0.2)
        print(f"{'labels':>8} {'local ms':>9} {'s3 ms':>9} {'ratio':>6}   (median of {args.rounds} commits each)")
        for n in [int(x) for x in args.labels.split(",")]:
            local = RunDir(Path(tempfile.mkdtemp(prefix="bench-commit-")) / "run").lock()
            remote = RunDir(f"s3://bench/run-{n}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1").lock()
            tl, tr = [], []
            for k in range(args.rounds):  # interleaved: the machine's noise hits both alike
                tl.append(_commit(local, n, k))
                tr.append(_commit(remote, n, k))
            local.unlock()
            remote.unlock()
            ml, mr = statistics.median(tl) * 1000, statistics.median(tr) * 1000
            print(f"{n:>8} {ml:>9.1f} {mr:>9.1f} {mr / ml:>6.1f}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
