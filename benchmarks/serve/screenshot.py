"""The playground's picture for the manual: docs/images/playground.png, 1280x800, after a generation.

    .venv/bin/python benchmarks/serve/screenshot.py MODEL [--prompt TEXT] [--max-tokens 80] [--seed 0] [--dark]
    .venv/bin/python benchmarks/serve/screenshot.py --url http://127.0.0.1:8000 [--api-key KEY]

MODEL is anything `gpt2lab serve` takes. Use a trained model: a random one gives every token under
1%, so the picture is all one colour. The script starts `gpt2lab serve` on a free port (or uses a
server already running at --url), opens the page in Debian's chromium through Playwright (never
`playwright install`: it downloads a browser), generates, hovers the least likely token of the
first lines so its alternatives show, and saves the screenshot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIEWPORT = {"width": 1280, "height": 800}
PROMPT = "The lighthouse keeper had not spoken to anyone in three years, until"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"gpt2lab serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    sys.exit(f"gpt2lab serve did not answer /health in {timeout:.0f} s:\n{log.read_text()}")


def shoot(url: str, args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install chromium, or give --chromium PATH")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=args.scale,
                                      color_scheme="dark" if args.dark else "light")
        if args.api_key:
            context.add_init_script(f"localStorage.setItem('gpt2lab.apiKey', {json.dumps(args.api_key)})")
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#model.ready", timeout=30_000)
        page.evaluate("""values => {
            for (const [id, value] of Object.entries(values)) {
                const el = document.getElementById(id);
                el.value = String(value);
                el.dispatchEvent(new Event('input', {bubbles: true}));
            }
        }""", {"prompt": args.prompt, "max-tokens": args.max_tokens, "seed": args.seed,
               "temperature": args.temperature, "top-k": args.top_k})
        page.click("#generate")
        page.wait_for_function("document.getElementById('stats').dataset.finish", timeout=300_000)
        if page.is_visible("#error"):
            sys.exit(f"the page shows an error: {page.inner_text('#error')}")
        # The least likely token of the first lines: its popover has room below it.
        index = page.evaluate("""() => {
            const box = document.getElementById('output').getBoundingClientRect();
            let best = -1, bestP = 2;
            document.querySelectorAll('#output .tok').forEach((el, i) => {
                const p = Number(el.dataset.p);
                if (el.dataset.p && el.getBoundingClientRect().top < box.top + 110 && p < bestP) {
                    best = i;
                    bestP = p;
                }
            });
            return best;
        }""")
        if index >= 0:
            page.locator("#output .tok").nth(index).hover()
            page.wait_for_selector("#popover:not([hidden])")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="what `gpt2lab serve` serves (omit with --url)")
    parser.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="the server's API key, if it has one")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dark", action="store_true", help="the dark colour scheme")
    parser.add_argument("--scale", type=float, default=1, help="device pixels per CSS pixel (2: a sharper picture)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "playground.png")
    parser.add_argument("--chromium", help="the browser (default: chromium on PATH)")
    args = parser.parse_args()
    if (args.model is None) == (args.url is None):
        parser.error("give a MODEL to serve, or --url of a running server")
    if args.url:
        shoot(args.url.rstrip("/"), args)
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "gpt2lab", "serve", args.model, "--port", str(port)]
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, log)
            shoot(url, args)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
