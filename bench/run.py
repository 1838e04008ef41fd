"""Run the benchmarks and write their figures into docs/benchmarks.md.

    python -m bench.run               # make bench: the full sizes, over 10 minutes
    python -m bench.run --quick       # make bench-quick: about three minutes
    python -m bench.run --only ingestion,transfer --out /tmp/b.md

Each run gets its own PostgreSQL database (``edgefleet_bench``, dropped at the
end), its own Mosquitto from docker/mosquitto/mosquitto.conf on a free loopback
port (and a second one from secure.conf for the secure hold), and its own Redis
database index. Nothing but 127.0.0.1 is touched.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import harness, report
from bench.context import QUICK, TINY, Context, Sizes

BENCHMARKS = ("ingestion", "partitions", "cluster", "transfer", "fanout", "hold", "api", "console", "delta")
# Named by the issue, not built yet: the report says so rather than show a number nobody measured.
NOT_YET: tuple[str, ...] = ()
REPO = Path(__file__).resolve().parent.parent


def _module(name: str):
    from importlib import import_module

    return import_module(f"bench.{name}")


def _setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    import django

    django.setup()


def run(names: list[str], sizes: Sizes, out: Path, command: str, *, database: str) -> list[report.Section]:
    harness.raise_fd_limit()
    sections: list[report.Section] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        workdir = Path(tmp)
        with harness.broker(workdir / "broker") as broker, harness.database(database) as url:
            env = harness.plane_env(url, broker.url, BRIDGE_FLUSH_MS="100", BRIDGE_BATCH_SIZE="1000",
                                    LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "INFO"),
                                    **_bench_signing_key())  # fmt: skip
            ctx = Context(workdir, broker, url, env, sizes, log=lambda m: print(f"bench: {m}", flush=True))
            _setup_django(ctx.env)
            _flush_redis(env["REDIS_URL"])
            print(f"bench: broker on {broker.url} (fd limit {broker.fd_limit()}), database {database}", flush=True)
            for name in names:
                t0 = time.monotonic()
                try:
                    section = _module(name).run(ctx)
                except Exception as exc:
                    traceback.print_exc()
                    section = report.Section(
                        name, f"python -m bench.run --only {name}", failed=f"{type(exc).__name__}: {exc}"
                    )
                section.notes.append(f"_Took {time.monotonic() - t0:.0f} s._")
                sections.append(section)
                _flush_redis(env["REDIS_URL"])
            from django.db import connections

            connections.close_all()
    header = [
        f"Measured {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC on {harness.machine()}.",
        f"Load average at the end: {harness.load_average()}; the whole run took {time.monotonic() - started:.0f} s.",
        "A load average above the core count means the machine was shared with other work during the run.",
        "",
        f"Command: `{command}`",
    ]
    pending = [report.Section("Not measured yet", "", notes=[f"- {name}" for name in NOT_YET])] if NOT_YET else []
    report.write(out, report.render(header, [*sections, *pending]))
    print(f"bench: wrote {out}", flush=True)
    return sections


def _bench_signing_key() -> dict[str, str]:
    """A throwaway Ed25519 key for this run: the plane signs what it publishes and DEBUG is off."""
    if os.environ.get("SIGNING_KEY") or os.environ.get("SIGNING_KEY_FILE"):
        return {}
    try:
        from agent.contract import signing
    except ImportError:
        return {}
    generate = getattr(signing, "generate_private_key", None)
    return {"SIGNING_KEY": generate()} if generate else {}


def _flush_redis(url: str) -> None:
    """The bench's own Redis database: Celery tasks a benchmark left behind must not leak into the next."""
    try:
        import redis

        redis.Redis.from_url(url).flushdb()
    except Exception as exc:  # Redis is optional for the benchmarks that need no worker
        print(f"bench: could not flush {url}: {exc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes: checks only that everything runs")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--database", default="edgefleet_bench", help="PostgreSQL database to create and drop")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    sizes = TINY if args.tiny else QUICK if args.quick else Sizes()
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    sections = run(names, sizes, args.out, command.strip(), database=args.database)
    return 1 if any(s.failed for s in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
