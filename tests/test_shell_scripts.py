"""The shell scripts from a new shell: no virtual environment activated, PYTHON unset."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
NO_ENVIRONMENT = "error: no .venv and no python with torch on PATH: run: bash scripts/setup_env.sh"


def new_shell(path: str, **settings) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "VIRTUAL_ENV")}
    return dict(env, PATH=path, **settings)


def path_without_the_venv() -> str:
    """PATH as a new shell has it: without the folder of the interpreter running the tests."""
    venvs = {os.path.realpath(os.path.dirname(sys.executable)), os.path.realpath(os.path.dirname(VENV_PYTHON))}
    return os.pathsep.join(entry for entry in os.environ["PATH"].split(os.pathsep)
                           if entry and os.path.realpath(entry) not in venvs)


def scripts_copy(tmp_path) -> str:
    """serve_api.sh and common.sh in a repository folder of their own, where a test decides what .venv holds."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("common.sh", "serve_api.sh"):
        shutil.copy(os.path.join(REPO, "scripts", name), root / "scripts")
    return str(root)


def executable(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o755)


def serve_api(root: str, env: dict) -> subprocess.CompletedProcess:
    # MODEL: a folder name that the script does not convert first (only the default model is).
    return subprocess.run([shutil.which("bash"), os.path.join(root, "scripts", "serve_api.sh")],
                          cwd=os.path.dirname(root), env=dict(env, MODEL="some-model"),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not os.path.exists(VENV_PYTHON), reason="no .venv in the repository (setup_env.sh makes it)")
def test_a_script_runs_from_a_new_shell_on_the_project_venv(tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "serve_api.sh"), "--help"], cwd=tmp_path,
                            env=new_shell(path_without_the_venv(), MODEL=str(tmp_path / "model")),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--base_model" in result.stdout and "Traceback" not in result.stderr


def test_the_scripts_prefer_the_venv_then_a_python_with_torch_else_say_how_to_make_one(tmp_path):
    root = scripts_copy(tmp_path)
    bin_dir = tmp_path / "bin"  # a PATH with no real python on it
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    # A python on PATH without torch: the script stops with one line and status 2.
    executable(bin_dir / "python", "#!/bin/sh\nexit 1\n")
    result = serve_api(root, new_shell(str(bin_dir)))
    assert result.returncode == 2
    assert result.stderr.strip() == NO_ENVIRONMENT
    # A python on PATH that imports torch serves where there is no .venv.
    executable(bin_dir / "python", '#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "python on PATH: $*"\n')
    result = serve_api(root, new_shell(str(bin_dir)))
    assert result.returncode == 0 and result.stdout.startswith("python on PATH: openai_api.py --base_model some-model")
    # The project's .venv wins over PATH, activated or not ...
    executable(os.path.join(root, ".venv", "bin", "python"), '#!/bin/sh\necho "venv: $0 $*"\n')
    result = serve_api(root, new_shell(str(bin_dir)))
    assert result.returncode == 0
    assert result.stdout.startswith(f"venv: {root}/.venv/bin/python openai_api.py --base_model some-model")
    # ... and PYTHON over both.
    result = serve_api(root, new_shell(str(bin_dir), PYTHON=str(bin_dir / "python")))
    assert result.stdout.startswith("python on PATH: openai_api.py")


@pytest.mark.parametrize("script, health", [("serve_api.sh", "/health"), ("serve_gradio.sh", "/")])
def test_sigterm_to_a_serving_script_stops_its_server(tiny_model_dir, tmp_path, script, health):
    """A process manager stops a service by signalling the process it started: the script itself. The server
    must go with it, not live on as an orphan holding the port."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(["bash", os.path.join(REPO, "scripts", script)], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, MODEL=tiny_model_dir, TEMPLATE="chatml",
                                                                  PORT=str(port), OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        assert process.poll() is None, open(tmp_path / "server.log").read()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        with pytest.raises(OSError):  # nobody is listening any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["pkill", "-f", "--", f"--port {port}"], check=False)  # an orphan of a failed run
