"""A local stand-in for the Hugging Face Hub, to try publishing offline: the server the tests publish to
(tests/hub_server.py), in the foreground until Ctrl-C. It prints the variables that point huggingface_hub, and so
megapico's publishing, `hf download` and pico-analyze's remote mode, at it:

    python scripts/local_hub.py              # a free port the OS picks; --port N for that one
    export HF_ENDPOINT=http://127.0.0.1:PORT HF_TOKEN=hf_local HF_HUB_DISABLE_XET=1   # in another shell: its line

It keeps repositories in memory and LFS files under --storage (default: a temporary directory removed when it
stops), so both are gone when it stops. It is not the Hub: no accounts (any token is accepted), no Xet, listening on
127.0.0.1 only.
"""

import argparse
import signal
import sys
import tempfile
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub_server import HubServer, _handler  # noqa: E402

TOKEN = "hf_local"  # the server accepts any; huggingface_hub wants one to send


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--storage", type=Path,
                        help="where uploaded LFS files go (default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (1-65535)")
    with tempfile.TemporaryDirectory(prefix="megapico-local-hub-") as scratch:
        hub = HubServer(args.storage or Path(scratch))
        hub.httpd.server_close()  # its own listener (port 0, for the tests' thread): this process serves on its port
        try:
            server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(hub))
        except OSError as err:
            print(f"error: port {args.port} on 127.0.0.1 is taken ({err.strerror}); pick another with --port, or "
                  f"leave it out", file=sys.stderr, flush=True)
            return 1
        server.daemon_threads = True
        url = hub.url = f"http://127.0.0.1:{server.server_address[1]}"  # the URLs it answers with (LFS uploads)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain kill stops it like Ctrl-C, cleaning up
        print(f"local Hub at {url} (repositories in memory, LFS files in {hub.storage}; Ctrl-C stops it). Export:",
              flush=True)
        print(f"export HF_ENDPOINT={url} HF_TOKEN={TOKEN} HF_HUB_DISABLE_XET=1", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
