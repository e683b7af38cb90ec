"""Load test of the app: many users generating at once through gradio_client.

    python -m tests.load_test --requests 16                  # starts the app on loopback with tiny random models
    python -m tests.load_test --url http://127.0.0.1:7860/ --pid PID --model KEY --classes a,b,c

Every request has its own seed and class and its own client (its own session, like a separate user).
After a first request (the memory baseline) all of them are fired at once; each must be served or
refused cleanly by the queue. Then the users' clients close, every served request is run again alone,
one after the other, and its images (previews, scale-by-scale strips, final PNGs) must equal the
concurrent ones pixel for pixel: no cross-talk between users. Printed: requests served / refused /
failed, latency percentiles, and the server's memory from /proc: VmRSS after the first request, at the
end of the burst, and after the run (once the users' sessions are closed: Gradio notices a client has
gone within its 15 s heartbeat, and the app then drops what it kept for that session), and VmHWM (peak).
Exit status 1 when a check fails (RSS after the run more than 10% above RSS after the first request).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TINY_CLASSES = [f"class-{i}" for i in range(12)]  # the class names of tests/app_server.py's tiny models
MAX_RSS_GROWTH = 0.10


@dataclass
class Outcome:
    seed: int
    class_name: str
    status: str = "pending"  # served | refused | failed
    seconds: float = 0.0
    error: str = ""
    images: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    rss_first_mib: float | None  # server VmRSS after the first request
    rss_burst_mib: float | None  # server VmRSS when the concurrent requests are done
    rss_after_mib: float | None  # server VmRSS after the run, the users' sessions closed
    peak_mib: float | None  # server VmHWM (peak RSS since it started)
    wall_seconds: float
    mismatches: list[str] = field(default_factory=list)  # requests whose images differ from a run alone
    compared: bool = False  # whether the served requests were run again alone

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def latencies(self) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.status == "served")

    def percentile(self, q: float) -> float | None:
        lat = self.latencies
        return float(np.percentile(lat, q)) if lat else None

    @property
    def rss_growth(self) -> float | None:
        if self.rss_first_mib is None or self.rss_after_mib is None:
            return None
        return self.rss_after_mib / self.rss_first_mib - 1

    def problems(self, max_rss_growth: float = MAX_RSS_GROWTH) -> list[str]:
        out = [f"request seed={o.seed} class={o.class_name} failed: {o.error}"
               for o in self.outcomes if o.status == "failed"]
        out += [f"images differ from the same request run alone: {m}" for m in self.mismatches]
        if self.count("served") == 0:
            out.append("no request was served")
        growth = self.rss_growth
        if growth is not None and growth > max_rss_growth:
            out.append(f"server RSS grew {growth:.1%} over the run (limit {max_rss_growth:.0%})")
        return out

    def summary(self) -> str:
        def sec(value):
            return "-" if value is None else f"{value:.2f} s"

        def mib(value):
            return "-" if value is None else f"{value:.0f} MiB"

        growth = self.rss_growth
        lines = [
            f"requests: {len(self.outcomes)} fired at once, {self.count('served')} served, "
            f"{self.count('refused')} refused (queue full), {self.count('failed')} failed, "
            f"in {self.wall_seconds:.1f} s",
            f"latency (served): p50 {sec(self.percentile(50))}, p90 {sec(self.percentile(90))}, "
            f"max {sec(max(self.latencies, default=None))}",
            f"server memory: RSS after first request {mib(self.rss_first_mib)}, end of burst "
            f"{mib(self.rss_burst_mib)}, after the run {mib(self.rss_after_mib)}"
            + ("" if growth is None else f" ({growth:+.1%})")
            + f", peak (VmHWM) {mib(self.peak_mib)}",
            f"cross-talk check: {len(self.mismatches)} of {self.count('served')} served requests differ from "
            "the same seed and class run alone" if self.compared else "cross-talk check: skipped (--no-compare)",
        ]
        return "\n".join(lines)


def proc_status_mib(pid: int | None, key: str) -> float | None:
    """A memory line (VmRSS, VmHWM, ...) of /proc/<pid>/status, in MiB; None without a pid."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(f"{key} not in /proc/{pid}/status")


def result_images(result) -> dict[str, np.ndarray]:
    """The image files in a /generate result, as pixel arrays keyed by their role."""
    from PIL import Image

    def load(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    images = {}
    for role, gallery in (("MVAR", result[0]), ("VAR", result[1])):  # every sample's final image, PNG
        for i, item in enumerate(gallery):
            images[f"{role} final {i}"] = load(item["image"])
    return images


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    if a.keys() != b.keys():
        return [f"different images: {sorted(a)} vs {sorted(b)}"]
    return [name for name in a if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name])]


def run_load_test(url: str, pid: int | None = None, requests: int = 16, model: str = "custom",
                  classes: list[str] | None = None, images: int = 1, dtype: str = "fp32", seed: int = 1000,
                  compare: bool = True, settle: float = 20.0, log=print) -> LoadReport:
    """Fire ``requests`` concurrent generations at the app at ``url`` (server process ``pid``, for memory).

    ``settle``: seconds between closing the users' clients and the final memory reading.
    """
    from gradio_client import Client
    from gradio_client.utils import QueueError

    classes = classes or TINY_CLASSES

    def arguments(seed_value: int, class_name: str) -> tuple:
        # model, class_name, seed, cfg, top_k, top_p, images, precision
        return model, class_name, seed_value, 1.0, 10, 0.95, images, dtype

    first = Client(url, verbose=False)
    first.predict(*arguments(seed - 1, classes[0]), api_name="/generate")
    rss_first = proc_status_mib(pid, "VmRSS")
    log(f"first request done; server RSS {rss_first if rss_first is None else round(rss_first)} MiB")

    outcomes = [Outcome(seed + i, classes[i % len(classes)]) for i in range(requests)]
    with ThreadPoolExecutor(requests) as pool:  # one client (one session) per user
        clients = list(pool.map(lambda _: Client(url, verbose=False), range(requests)))
    start = threading.Barrier(requests)

    def user(client, outcome: Outcome) -> None:
        start.wait()
        began = time.perf_counter()
        try:
            result = client.predict(*arguments(outcome.seed, outcome.class_name), api_name="/generate")
            outcome.images = result_images(result)
            outcome.status = "served"
        except QueueError as err:  # Gradio refused it: the queue was full
            outcome.status, outcome.error = "refused", str(err)
        except Exception as err:  # noqa: BLE001 - reported, not raised (AppError: the app's own message)
            outcome.status, outcome.error = "failed", f"{type(err).__name__}: {err}"
        outcome.seconds = time.perf_counter() - began

    log(f"firing {requests} requests at once")
    began = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(user, clients, outcomes))
    wall = time.perf_counter() - began
    report = LoadReport(outcomes, rss_first, proc_status_mib(pid, "VmRSS"), None, None, wall)
    for client in clients:
        client.close()
    closed = time.monotonic()

    if compare:
        report.compared = True
        log(f"running the {report.count('served')} served requests again, one at a time")
        for outcome in outcomes:
            if outcome.status != "served":
                continue
            alone = result_images(first.predict(*arguments(outcome.seed, outcome.class_name), api_name="/generate"))
            differing = differences(outcome.images, alone)
            if differing:
                report.mismatches.append(f"seed={outcome.seed} class={outcome.class_name}: {', '.join(differing)}")
    first.close()
    wait = closed + settle - time.monotonic()
    if wait > 0:
        log(f"waiting {wait:.0f} s for the server to notice the users have gone")
        time.sleep(wait)
    report.rss_after_mib, report.peak_mib = proc_status_mib(pid, "VmRSS"), proc_status_mib(pid, "VmHWM")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Concurrent generation requests against MVAR Studio")
    parser.add_argument("--requests", type=int, default=16, help="requests fired at once (default 16)")
    parser.add_argument("--url", help="an app already running (default: start one with tiny random models)")
    parser.add_argument("--pid", type=int, help="its server process, for memory figures (with --url)")
    parser.add_argument("--model", default="custom", help="model key (default: the tiny test models' 'custom')")
    parser.add_argument("--classes", help="comma-separated class names to cycle through (default: the tiny ones)")
    parser.add_argument("--images", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=1000, help="request i uses seed SEED + i")
    parser.add_argument("--queue-size", type=int, help="the started app's --queue-size (default: the app's)")
    parser.add_argument("--concurrency", type=int, help="the started app's --concurrency (default: the app's)")
    parser.add_argument("--no-compare", action="store_true", help="skip re-running each request alone")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds from the users leaving to the final memory reading (default 20)")
    parser.add_argument("--max-rss-growth", type=float, default=MAX_RSS_GROWTH,
                        help="allowed RSS growth after the run, relative to after the first request (default 0.10)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    classes = args.classes.split(",") if args.classes else None

    server = None
    url, pid = args.url, args.pid
    if url is None:
        from tests.app_server import AppServer

        extra = []
        if args.queue_size is not None:
            extra += ["--queue-size", str(args.queue_size)]
        if args.concurrency is not None:
            extra += ["--concurrency", str(args.concurrency)]
        folder = Path(tempfile.mkdtemp(prefix="mvar-load-"))
        print(f"starting the app with tiny random models (log: {folder / 'server.log'})")
        server = AppServer(folder, extra_args=extra)
        url, pid = server.url, server.process.pid
    try:
        report = run_load_test(url, pid, args.requests, args.model, classes, args.images, args.dtype, args.seed,
                               compare=not args.no_compare, settle=args.settle)
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    problems = report.problems(args.max_rss_growth)
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
