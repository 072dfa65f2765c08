"""Regenerate assets/app.png: app.py on the demo model, one demo test image checked, in Debian's
Chromium driven by Playwright (tests/test_app.py drives the page the same way).

    python assets/screenshot_app.py                  # after make demo; needs requirements-app.txt,
                                                     # playwright and /usr/bin/chromium
"""
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for files.py
from files import write_atomic  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (apt-get install chromium): Playwright's own download is not needed
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoint, log, env=None, timeout=180):
    """app.py on `checkpoint` in a subprocess, its output in `log`; yields the page's URL once it
    answers, and stops it with SIGTERM (as `kill` would) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint),
                                "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + timeout
            while True:
                if app.poll() is not None:
                    raise RuntimeError(f"app.py exited with {app.returncode}:\n{Path(log).read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"app.py did not answer in {timeout} s:\n{Path(log).read_text()[-3000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            app.terminate()
            try:
                app.wait(30)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()


def launch_chromium(playwright):
    """Headless Debian Chromium with its background calls home switched off."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def offline_page(browser, url):
    """A page on which every request outside `url` is refused and recorded: (page, refused URLs)."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    refused = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    return page, refused


def check_image(page, url, image, timeout_ms=120_000):
    """Open the page, upload `image` and wait for its result; returns the result text."""
    page.goto(url)
    page.locator("#upload input[type=file]").set_input_files(str(image))
    page.locator("#result").get_by_text("P(malignant)").wait_for(timeout=timeout_ms)
    page.locator("#heat img").wait_for(timeout=timeout_ms)
    return page.locator("#result").inner_text()


def main():
    from playwright.sync_api import sync_playwright

    checkpoint = ROOT / "runs" / "demo" / "outputs" / "best.pth"
    image = sorted((ROOT / "assets" / "isic2017_demo" / "test_data" / "1").glob("*.jpg"))[0]
    if not checkpoint.is_file():
        sys.exit("screenshot_app.py: error: no demo model; run make demo first")
    with serve(checkpoint.relative_to(ROOT), "/tmp/screenshot_app.log") as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page, refused = offline_page(browser, url)
        print(check_image(page, url, image))
        png = page.screenshot(full_page=True)
        browser.close()
    if refused:
        sys.exit(f"screenshot_app.py: error: the page asked for {refused}")
    write_atomic(ROOT / "assets" / "app.png", lambda tmp: tmp.write_bytes(png))
    print(f"wrote {ROOT / 'assets' / 'app.png'}")


if __name__ == "__main__":
    main()
