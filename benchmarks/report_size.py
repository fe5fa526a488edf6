"""Size and load time of the HTML report for Llama 3 405B on 16384 H100s (target: < 5 MB, < 3 s).

    python benchmarks/report_size.py [--plan existing.json] [--keep report.html]

Plans the model (~30 s), renders ``autoplan show -o``, then opens the page in headless
Chromium (Debian's ``chromium``) and reads the page's own load time (``performance.now()`` at
the load event, written into ``#report-status``) and the wall time of the whole browser run.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="use this plan JSON instead of planning llama3-405b")
    ap.add_argument("--keep", help="also copy the report here")
    args = ap.parse_args()
    from autoplan.report.explain import load_plan
    from autoplan.report.html import render_html

    work = Path(tempfile.mkdtemp(prefix="report-size-"))
    if args.plan:
        plan_path = Path(args.plan)
    else:
        import autoplan

        t0 = time.perf_counter()
        plan = autoplan.plan("llama3-405b", cluster="dgx-h100", devices=16384, global_batch=2048, seq_len=8192)
        plan_path = work / "llama3-405b.json"
        plan.save(plan_path)
        print(f"planned llama3-405b on 16384 x H100 in {time.perf_counter() - t0:.1f} s "
              f"(plan JSON {plan_path.stat().st_size / 1e6:.2f} MB)")
    data = load_plan(plan_path)
    t0 = time.perf_counter()
    page = render_html(data, source=plan_path.name)
    render_s = time.perf_counter() - t0
    out = work / "report.html"
    out.write_text(page, encoding="utf-8")
    size = out.stat().st_size
    print(f"report: {size / 1e6:.3f} MB ({size:,} bytes), rendered in {render_s * 1e3:.0f} ms  [target < 5 MB]")
    if args.keep:
        shutil.copy(out, args.keep)
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    ok = size < 5e6
    if exe is None:
        print("chromium not installed: load time not measured (apt-get install -y chromium)")
        return 0 if ok else 1
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--dump-dom", out.as_uri()],
                             capture_output=True, text=True, timeout=120)
        wall = time.perf_counter() - t0
    m = re.search(r'<div id="report-status"[^>]*>', res.stdout)
    status = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(0))) if m else {}
    load_ms = float(status.get("load-ms", "nan"))
    print(f"load: {load_ms / 1e3:.2f} s in the page (navigation start to load event), {wall:.2f} s wall for the whole "
          f"headless browser run; script errors {status.get('errors', '?')}, empty sections {status.get('empty', '?')}  [target < 3 s]")
    ok = ok and load_ms < 3000 and status.get("errors") == "0" and status.get("ready") == "1"
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
