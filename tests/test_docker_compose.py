"""Static checks of the Docker deployment (docker/): no engine, no images, under a minute.

* Every compose combination (base, +TLS, +GPU, +TLS+GPU, +grpc, +TLS+grpc) validates with
  `docker-compose config` (Debian's docker-compose 1.29; the file format is the Compose
  Specification, which Compose v2 reads too).
* Images are pinned; the Dockerfiles end as a non-root user; no certificate or key is tracked.
* Every SuperNode has its own partition-id, all of them cover 0..N-1 with num-partitions=N, and
  every SuperNode has its own SuperExec.
* The TLS override leaves nothing in plaintext; the GPU override reserves GPUs for the ClientApps
  and the ServerApp (which evaluates).
* The grpc override (transport = "grpc") binds the BN sync service in the ServerApp's container
  and advertises that compose service; with TLS, the channel's certificate, key and CA are
  mounted where the run config says, and docker/generate-certs.sh issues that certificate for
  the advertised name. The run config `submit` would submit is one the app accepts.
* The locked requirements cover pyproject.toml's dependencies.
The end-to-end run lives in scripts/docker_demo.sh (needs root and a few GB; see docs/docker.md).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
OVERRIDES = {
    "base": [],
    "tls": [DOCKER / "with-tls.yml"],
    "gpu": [DOCKER / "with-gpu.yml"],
    "tls+gpu": [DOCKER / "with-tls.yml", DOCKER / "with-gpu.yml"],
    "grpc": [DOCKER / "with-grpc.yml"],
    "tls+grpc": [DOCKER / "with-tls.yml", DOCKER / "with-grpc.yml"],
}
FLWR_VERSION = "1.42.0"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose not installed (apt-get install -y docker-compose)",
)


def _compose_env() -> dict[str, str]:
    """The environment without any variable that the compose files read: defaults only."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FEDTAN_", "FLWR_", "TORCH_", "SUPERLINK_", "COMPOSE_"))
    }


def _compose(files: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(DOCKER_COMPOSE), "-f", str(COMPOSE)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run(
        [*cmd, *args],
        cwd=ROOT,
        env=_compose_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


_resolved: dict[str, dict] = {}


def resolved(name: str) -> dict:
    """`docker-compose config` of one combination, parsed (cached)."""
    if name not in _resolved:
        proc = _compose(OVERRIDES[name], "config")
        assert proc.returncode == 0, proc.stderr
        _resolved[name] = yaml.safe_load(proc.stdout)
    return _resolved[name]


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], flag: str) -> str | None:
    """Value of ``--flag value`` or ``--flag=value`` in an argument list."""
    for i, arg in enumerate(cmd):
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _supernodes(config: dict) -> dict[str, list[str]]:
    return {
        name: _command(svc)
        for name, svc in config["services"].items()
        if "--node-config" in _command(svc)
    }


# --------------------------------------------------------------------------- compose validity


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_compose_combination_is_valid(name: str) -> None:
    proc = _compose(OVERRIDES[name], "config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_compose_files_use_the_compose_specification() -> None:
    # No `version:` key: docker-compose 1.29 then reads the Compose Specification (and Compose v2
    # warns about `version:` as obsolete).
    for path in [COMPOSE, *{p for files in OVERRIDES.values() for p in files}]:
        assert "version" not in yaml.safe_load(path.read_text()), path


# --------------------------------------------------------------------------- images


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_every_image_is_pinned(name: str) -> None:
    for svc_name, svc in resolved(name)["services"].items():
        image = svc.get("image")
        assert image, f"{svc_name} has no image tag"
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag and tag != "latest", f"{svc_name}: {image} is not pinned"
        if repo.startswith("flwr/"):
            assert tag == FLWR_VERSION, f"{svc_name}: {image}"
        for arg, value in ((svc.get("build") or {}).get("args") or {}).items():
            if arg == "BASE_IMAGE":
                assert value == f"flwr/superexec:{FLWR_VERSION}", f"{svc_name}: {value}"


@needs_compose
def test_flower_components_use_flowers_images() -> None:
    services = resolved("base")["services"]
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR_VERSION}"
    for name in _supernodes(resolved("base")):
        assert services[name]["image"] == f"flwr/supernode:{FLWR_VERSION}"
    superexecs = [n for n in services if n.startswith("superexec-")]
    assert superexecs
    for name in superexecs:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_app_dockerfile_base_is_pinned_and_overridable() -> None:
    ins = _instructions(DOCKER / "Dockerfile")
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for w, rest in ins
        if w == "ARG" and "=" in rest
    }
    assert args["BASE_IMAGE"] == f"flwr/superexec:{FLWR_VERSION}"
    froms = [rest.split()[0] for w, rest in ins if w == "FROM"]
    assert froms[-1] == "${BASE_IMAGE}"
    assert all(f in ("scratch", "${BASE_IMAGE}") for f in froms), froms


def test_stand_in_base_matches_flowers_version() -> None:
    ins = _instructions(DOCKER / "local-base" / "Dockerfile")
    assert ("ARG", f"FLWR_VERSION={FLWR_VERSION}") in ins
    entrypoints = [rest for w, rest in ins if w == "ENTRYPOINT"]
    for exe in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert any(exe in e for e in entrypoints), exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "local-base/Dockerfile"])
def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    """Every stage that is an image (has an ENTRYPOINT) ends as a named, non-root user.

    A stage built on an outside image starts as unknown (None): the Dockerfile has to say.
    """
    stage_user: dict[str, str | None] = {}
    stage, user, images = None, None, 0
    for word, rest in _instructions(DOCKER / dockerfile) + [("FROM", "end")]:
        if word == "FROM":
            if stage is not None:
                stage_user[stage] = user
            parts = rest.split()
            stage = parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else rest
            user = stage_user.get(parts[0])
        elif word == "USER":
            user = rest.split(":")[0]
        elif word == "ENTRYPOINT":
            images += 1
            assert user not in (None, "root", "0"), f"{dockerfile}: ENTRYPOINT as {user or 'root'}"
    assert images
    assert stage_user[list(stage_user)[-1]] not in (None, "root", "0")


def test_no_secrets_in_dockerfiles() -> None:
    for path in (DOCKER / "Dockerfile", DOCKER / "local-base" / "Dockerfile"):
        text = path.read_text()
        assert not re.search(r"(?i)^\s*(COPY|ADD)\b.*\b(certs?|\.key|\.pem|\.crt)\b", text, re.M)
        assert not re.search(r"(?i)^\s*(ARG|ENV)\s+\S*(PASSWORD|SECRET|TOKEN)", text, re.M)


def test_app_image_gets_every_package() -> None:
    """The Dockerfile copies each top-level package that pyproject.toml installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    text = (DOCKER / "Dockerfile").read_text()
    for pattern in includes:
        pkg = pattern.rstrip("*").rstrip(".")
        assert re.search(rf"^COPY {pkg}/ /project/{pkg}/$", text, re.M), pkg
    for component in pyproject["tool"]["flwr"]["app"]["components"].values():
        assert component.split(".")[0] in [p.rstrip("*").rstrip(".") for p in includes]


def test_build_context_filter_keeps_what_the_dockerfile_copies() -> None:
    """The root .dockerignore (a whitelist) lets through every path the build copies."""
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKER.parent / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = []
    for word, rest in _instructions(DOCKER / "Dockerfile"):
        if word == "COPY" and "--from=" not in rest:
            sources += [s.rstrip("/") for s in rest.split()[:-1] if not s.startswith("--")]
    assert sources
    assert set(sources) <= allowed, set(sources) - allowed


# --------------------------------------------------------------------------- requirements


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line), line
            name_, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name_).lower()] = version
    return pins


def test_locks_pin_pyprojects_dependencies() -> None:
    from packaging.requirements import Requirement

    pins = _lock("requirements.lock")
    cuda = _lock("requirements-cuda.lock")
    assert not set(pins) & set(cuda), "a package is in both locks"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for dep in map(Requirement, deps):
        key = re.sub(r"[-_.]+", "-", dep.name).lower()
        if key in ("torch", "torchvision"):
            # cpu variant: the Dockerfile pins them; cuda variant: requirements-cuda.lock.
            assert dep.specifier.contains(cuda[key]), (dep, cuda[key])
            assert f"{dep.name}=={cuda[key]}+cpu" in dockerfile, dep
            continue
        assert key in pins, f"{dep.name} is missing from docker/requirements.lock"
        assert dep.specifier.contains(pins[key], prereleases=True), (dep, pins[key])


# --------------------------------------------------------------------------- topology


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_every_supernode_has_its_own_partition(name: str) -> None:
    config = resolved(name)
    supernodes = _supernodes(config)
    assert len(supernodes) >= 2
    ids, totals = [], set()
    for cmd in supernodes.values():
        node_config = dict(kv.split("=", 1) for kv in shlex.split(_flag(cmd, "--node-config")))
        ids.append(int(node_config["partition-id"]))
        totals.add(int(node_config["num-partitions"]))
    assert len(set(ids)) == len(ids), f"partition-ids repeat: {sorted(ids)}"
    assert totals == {len(supernodes)}, totals
    assert sorted(ids) == list(range(len(supernodes)))
    # The run is submitted for exactly that many clients.
    env = config["services"]["submit"]["environment"]
    assert int(env["FEDTAN_NUM_SUPERNODES"]) == len(supernodes)


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_every_supernode_has_its_own_superexec(name: str) -> None:
    services = resolved(name)["services"]
    targets = {
        svc: _flag(_command(s), "--runtime-api-address")
        for svc, s in services.items()
        if svc.startswith("superexec-")
    }
    assert targets.pop("superexec-serverapp") == "superlink:9093"
    hosts = sorted(t.split(":")[0] for t in targets.values())
    assert hosts == sorted(_supernodes(resolved(name))), targets


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_superlink_runs_offline_with_external_superexec(name: str) -> None:
    cmd = _command(resolved(name)["services"]["superlink"])
    assert "--disable-runtime-dependency-installation" in cmd
    assert _flag(cmd, "--isolation") == "process"
    for svc, s in resolved(name)["services"].items():
        if "--node-config" in _command(s):
            assert _flag(_command(s), "--isolation") == "process", svc
        assert "--allow-runtime-dependency-installation" not in _command(s), svc


@needs_compose
def test_results_folder_is_mounted_where_the_run_writes() -> None:
    services = resolved("base")["services"]
    mounts = services["superexec-serverapp"]["volumes"]
    targets = [m.split(":")[1] if isinstance(m, str) else m["target"] for m in mounts]
    assert "/app/outputs" in targets
    cli = (DOCKER / "fedtan-cli.sh").read_text()
    assert 'FEDTAN_OUTPUT_DIR="${FEDTAN_OUTPUT_DIR:-/app/outputs/' in cli


# --------------------------------------------------------------------------- TLS and GPU


@needs_compose
@pytest.mark.parametrize("name", ["tls", "tls+gpu", "tls+grpc"])
def test_tls_leaves_nothing_in_plaintext(name: str) -> None:
    services = resolved(name)["services"]
    auth_keys = []
    for svc, s in services.items():
        cmd = _command(s)
        assert "--insecure" not in cmd, svc
        if svc.startswith(("superexec-", "supernode-")):
            assert _flag(cmd, "--root-certificates") == "/app/certs/ca.crt", svc
        if svc.startswith("supernode-"):
            assert _flag(cmd, "--ssl-certfile"), svc
            key = _flag(cmd, "--auth-supernode-private-key")
            sources = {m.split(":")[1]: m.split(":")[0] for m in s["volumes"]}
            auth_keys.append(sources[key])
    assert "--enable-supernode-auth" in _command(services["superlink"])
    assert len(set(auth_keys)) == len(auth_keys) == len(_supernodes(resolved(name)))
    assert services["submit"]["environment"]["FLWR_ROOT_CERTIFICATES"] == "/app/certs/ca.crt"
    registered = [a for a in _command(services["register-supernodes"]) if a.endswith(".pub")]
    assert len(registered) == len(auth_keys)
    # No container gets the CA's private key.
    for svc, s in services.items():
        for m in s.get("volumes", []):
            assert not str(m).split(":")[0].endswith("ca.key"), svc


@needs_compose
@pytest.mark.parametrize("name", ["gpu", "tls+gpu"])
def test_gpu_override_reserves_gpus_for_the_apps(name: str) -> None:
    # The ClientApps train and the ServerApp evaluates: each SuperExec that launches them gets
    # a GPU; the Flower components that only relay messages do not.
    services = resolved(name)["services"]
    superexecs = [n for n in services if n.startswith("superexec-")]
    assert "superexec-serverapp" in superexecs
    assert len(superexecs) == 1 + len(_supernodes(resolved(name)))
    for svc in superexecs:
        devices = services[svc]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), svc
    for svc in ["superlink", *_supernodes(resolved(name))]:
        assert "deploy" not in services[svc], svc
    images = {s["image"] for n, s in services.items() if "build" in s}
    assert len(images) == 1 and images.pop().endswith("-cuda")
    for s in services.values():
        if "build" in s:
            assert s["build"]["args"]["TORCH_VARIANT"] == "cuda"


# --------------------------------------------------------------------------- grpc transport

# What docker/fedtan-cli.sh merges into the run config, in its order (later ones win).
CLI_RUN_CONFIG_VARS = ("FEDTAN_GRPC_RUN_CONFIG", "FEDTAN_TLS_RUN_CONFIG", "FEDTAN_RUN_CONFIG")


def _run_config_var(service: dict, var: str) -> dict:
    from flwr.common.config import parse_config_args

    value = (service.get("environment") or {}).get(var) or ""
    return parse_config_args([value]) if value else {}


def _serverapp_service(services: dict) -> str:
    """The SuperExec that launches the ServerApp: the one attached to the SuperLink."""
    (name,) = [
        svc
        for svc, s in services.items()
        if svc.startswith("superexec-")
        and _flag(_command(s), "--runtime-api-address") == "superlink:9093"
    ]
    return name


def _submitted_run_config(services: dict) -> dict:
    """The run config `submit` would send, merged as docker/fedtan-cli.sh does."""
    from flwr.common.config import flatten_dict

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    env = services["submit"]["environment"]
    config.update(flatten_dict(tomllib.loads((ROOT / env["FEDTAN_RUN_CONFIG_FILE"]).read_text())))
    config["num-clients"] = int(env["FEDTAN_NUM_SUPERNODES"])
    for var in CLI_RUN_CONFIG_VARS:
        config.update(_run_config_var(services["submit"], var))
    return config


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Mount target -> (source, mode)."""
    out = {}
    for m in service.get("volumes", []):
        source, target, *mode = m.split(":") if isinstance(m, str) else (m["source"], m["target"])
        out[target] = (source, mode[0] if mode else "rw")
    return out


@needs_compose
@pytest.mark.parametrize("name", ["grpc", "tls+grpc"])
def test_grpc_override_binds_and_advertises_the_serverapps_container(name: str) -> None:
    from common.experiment.config import RunConfig

    services = resolved(name)["services"]
    cfg = _run_config_var(services["submit"], "FEDTAN_GRPC_RUN_CONFIG")
    assert cfg["transport"] == "grpc"
    assert cfg["bn-sync-host"] == "0.0.0.0"  # every interface of the container, not loopback
    port = cfg["bn-sync-port"]
    assert isinstance(port, int) and port > 0, "a fixed port: the clients are told it up front"
    host, _, advertised_port = cfg["bn-sync-address"].rpartition(":")
    assert int(advertised_port) == port
    # The clients dial the compose service in whose container the ServerApp runs, by name.
    assert host == _serverapp_service(services)
    assert str(port) in [str(p) for p in services[host].get("expose", [])]
    assert not services[host].get("ports"), "the channel is not published on the host"
    # Generous enough for ClientApp processes that start at different times.
    assert cfg["bn-sync-timeout"] >= 120
    # What submit sends is accepted by the app as is.
    run = RunConfig.from_flower(_submitted_run_config(services))
    assert run.transport == "grpc" and run.method == "fedtan"
    assert bool(run.bn_sync_certfile) == ("tls" in name)


@needs_compose
@pytest.mark.parametrize("name", ["tls", "tls+grpc"])
def test_tls_mounts_the_bn_sync_certificate_where_the_run_config_says(name: str) -> None:
    services = resolved(name)["services"]
    cfg = _run_config_var(services["submit"], "FEDTAN_TLS_RUN_CONFIG")
    serverapp = _serverapp_service(services)
    mounts = _mounts(services[serverapp])
    expected = {
        "bn-sync-certfile": "bn-sync.crt",
        "bn-sync-keyfile": "bn-sync.key",
        "bn-sync-ca-certfile": "ca.crt",
    }
    for key, filename in expected.items():
        path = cfg[key]
        assert path in mounts, f"{key}={path} is not mounted into {serverapp}"
        source, mode = mounts[path]
        assert Path(source).name == filename and mode == "ro", (key, source, mode)
    # The key of the channel goes to the ServerApp's container only.
    for svc, s in services.items():
        if svc != serverapp:
            assert not any(Path(src).name == "bn-sync.key" for src, _ in _mounts(s).values()), svc


@needs_compose
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_submitted_run_config_is_valid(name: str) -> None:
    from common.experiment.config import RunConfig

    run = RunConfig.from_flower(_submitted_run_config(resolved(name)["services"]))
    assert run.transport == ("grpc" if "grpc" in name else "messages")


@needs_compose
def test_plain_grpc_has_no_tls_settings() -> None:
    services = resolved("grpc")["services"]
    assert not _run_config_var(services["submit"], "FEDTAN_TLS_RUN_CONFIG")
    for svc, s in services.items():
        assert not any("/certs/" in target for target in _mounts(s)), svc


def test_fedtan_cli_merges_the_override_run_configs_in_order(tmp_path: Path) -> None:
    """fedtan-cli passes the override files' run config before the user's (which wins)."""
    text = (DOCKER / "fedtan-cli.sh").read_text()
    merge = re.search(r'python -c "\$MERGE_RUN_CONFIG"(.*?)\n\s*say ', text, re.S)
    assert merge, "the merge call is not where expected"
    quoted = re.findall(r'"\$(\w+)"', merge.group(1))
    assert tuple(quoted[-3:]) == CLI_RUN_CONFIG_VARS, quoted
    # The merge itself: later overrides win, empty ones are skipped.
    snippet = re.search(r"^MERGE_RUN_CONFIG='(.*?)^'", text, re.S | re.M).group(1)
    pytest.importorskip("tomli_w")
    merged = tmp_path / "run-config.toml"
    subprocess.run(
        [
            sys.executable,
            "-c",
            snippet,
            str(ROOT / "configs" / "digits.toml"),
            str(merged),
            'num-clients=3 output-dir="/app/outputs/x"',
            'transport="grpc" bn-sync-port=9095',
            "",
            "bn-sync-port=9100",
        ],
        check=True,
        capture_output=True,
    )
    config = tomllib.loads(merged.read_text())
    assert config["transport"] == "grpc" and config["bn-sync-port"] == 9100
    assert config["num-clients"] == 3 and config["dataset"] == "digits"


HAS_CERT_TOOLS = shutil.which("openssl") is not None and shutil.which("ssh-keygen") is not None


@pytest.fixture(scope="module")
def generated_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_CERT_TOOLS:
        pytest.skip("openssl and ssh-keygen are needed")
    out = tmp_path_factory.mktemp("certs")
    env = {**os.environ, "FEDTAN_CERTS_DIR": str(out)}
    proc = subprocess.run(
        ["bash", str(DOCKER / "generate-certs.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _sans(cert: Path) -> set[str]:
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {s.strip() for s in text.splitlines()[-1].split(",")}


def test_generated_bn_sync_certificate_covers_the_advertised_name(generated_certs: Path) -> None:
    advertised = "superexec-serverapp"
    if DOCKER_COMPOSE is not None:
        cfg = _run_config_var(resolved("tls+grpc")["services"]["submit"], "FEDTAN_GRPC_RUN_CONFIG")
        advertised = cfg["bn-sync-address"].rpartition(":")[0]
    assert {f"DNS:{advertised}", "DNS:localhost"} <= _sans(generated_certs / "bn-sync.crt")
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "bn-sync.crt"],
        cwd=generated_certs,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@needs_compose
@pytest.mark.parametrize("name", ["tls", "tls+grpc"])
def test_generate_certs_makes_every_file_tls_mounts(name: str, generated_certs: Path) -> None:
    """A missing source would be created by the engine as an empty folder: all must exist."""
    certs = ROOT / "docker" / "certs"
    for svc, s in resolved(name)["services"].items():
        for source, _ in _mounts(s).values():
            if Path(source).parent == certs:
                assert (generated_certs / Path(source).name).is_file(), (svc, source)


def test_generate_certs_adds_missing_files_to_an_existing_ca(tmp_path: Path) -> None:
    """A folder made before bn-sync.crt existed gets it, signed by the CA that is there."""
    if not HAS_CERT_TOOLS:
        pytest.skip("openssl and ssh-keygen are needed")
    env = {**os.environ, "FEDTAN_CERTS_DIR": str(tmp_path)}
    script = ["bash", str(DOCKER / "generate-certs.sh")]
    subprocess.run(script, env=env, capture_output=True, check=True, timeout=120)
    ca, superlink = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "superlink.crt").read_bytes()
    (tmp_path / "bn-sync.crt").unlink()
    (tmp_path / "bn-sync.key").unlink()
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adding bn-sync.crt" in proc.stdout
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "superlink.crt").read_bytes() == superlink
    assert (tmp_path / "bn-sync.key").is_file()
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "bn-sync.crt"], cwd=tmp_path, check=False
    )
    assert verify.returncode == 0
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "keeping them" in again.stdout


# --------------------------------------------------------------------------- repository hygiene


def test_no_certificates_or_keys_tracked() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    bad = [
        f
        for f in tracked
        if f.startswith("docker/certs/")
        or re.search(r"\.(pem|key|crt|csr|p12|pfx|srl)$", f)
        or re.search(r"(^|/)(id_(rsa|ecdsa|ed25519)|supernode-\d+)(\.pub)?$", f)
    ]
    assert not bad, f"certificates or keys tracked by git: {bad}"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "docker/certs/ca.key"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "docker/certs/ must be git-ignored"


@pytest.mark.parametrize(
    "script,shell",
    [
        ("docker/generate-certs.sh", "bash"),
        ("docker/fedtan-cli.sh", "sh"),
        ("scripts/docker_demo.sh", "bash"),
    ],
)
def test_shell_scripts_parse(script: str, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    proc = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
