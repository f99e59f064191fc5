"""scripts/local_hub.py, the offline publishing recipe's server: it starts, prints the variables to export, serves a
client configured by those alone (a repository created, a plain and an LFS file committed and read back), refuses a
taken port in one line and stops cleanly."""

import os
import socket
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "local_hub.py"
CLIENT = """
from huggingface_hub import HfApi, hf_hub_download
api = HfApi()
api.create_repo("me/try")
api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="me/try")
api.upload_file(path_or_fileobj=bytes(range(256)) * 64, path_in_repo="model.safetensors", repo_id="me/try")
text = open(hf_hub_download("me/try", "notes.txt")).read()
weights = open(hf_hub_download("me/try", "model.safetensors"), "rb").read()
print(text, weights == bytes(range(256)) * 64)
"""


def test_local_hub_serves_a_client_configured_by_what_it_prints(tmp_path):
    server = subprocess.Popen([sys.executable, str(SCRIPT), "--storage", str(tmp_path / "lfs")], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout.readline().startswith("local Hub at http://127.0.0.1:")
        words = server.stdout.readline().split()
        assert words[0] == "export"
        variables = dict(word.split("=", 1) for word in words[1:])
        assert variables.keys() == {"HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET"}
        environment = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
        client = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=120,
                                env={**environment, **variables, "HF_HOME": str(tmp_path / "hf_home")})
        assert client.returncode == 0, client.stderr[-2000:]
        assert client.stdout.split() == ["hello", "True"]
        assert any((tmp_path / "lfs").iterdir())  # the LFS file went through the HTTP upload into --storage
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, str(SCRIPT), "--port", str(port)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"error: port {port} on 127.0.0.1 is taken (Address already in use); pick another with "
                          f"--port, or leave it out\n")
