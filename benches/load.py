#!/usr/bin/env python3
"""The load bench: throughput, latency, CPU per request and memory of tollgate against the
same fast mock provider on loopback, side by side with the mock alone, bare Envoy, and the
peer gateways that install here (crabllm, LiteLLM, Portkey). Every gateway does the same job:
authenticate a client key, inject an upstream key, forward (bare Envoy only forwards).

    make bench-load                 # installs what it needs, writes benches/RESULTS.md
    python3 benches/load.py --help  # options (duration, rounds, targets)

Every process it starts runs in its own process group and is killed on exit, also on
failure or Ctrl-C. Figures are from one run on one machine: compare ratios, not absolutes.
"""

import argparse
import atexit
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benches" / ".peers"
RESULTS = ROOT / "benches" / "RESULTS.md"
TOLLGATE = ROOT / "target" / "release" / "tollgate"
MOCK = ROOT / "target" / "release" / "mock-provider"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "tollgate_filter.wasm"
ENVOY = ROOT / ".venv" / "bin" / "envoy"

CLIENT_KEY = "tg-bench-client-key"
UPSTREAM_KEYS = ["sk-bench-upstream-1", "sk-bench-upstream-2"]
LITELLM_MASTER = "sk-litellm-bench-master"
CRABLLM_VERSION = "0.0.25"
PORTKEY_VERSION = "1.15.2"
WORKERS = 2

CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTED: list = []
WORKDIR = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- processes ---------------------------------------------------------------------------


class Proc:
    """A process in its own group, logged to a file, killed with its children at exit."""

    def __init__(self, name, cmd, env=None, cwd=None, announces=False):
        self.name = name
        self.log_path = WORKDIR / f"{name}.log"
        self.log = open(self.log_path, "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(
            [str(c) for c in cmd],
            # Only a process that announces its address has its stdout read; any other's goes
            # to the log, or a chatty one would block on a full pipe.
            stdout=subprocess.PIPE if announces else self.log,
            stderr=self.log,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        STARTED.append(self)

    def first_line(self, timeout=30):
        """The first stdout line (the mock and tollgate announce their address)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.p.stdout.readline().decode().strip()
            if line:
                return line
            if self.p.poll() is not None:
                break
        raise RuntimeError(f"{self.name} said nothing; see {self.log_path}")

    def pids(self):
        """The process and all its descendants (LiteLLM and Node fork workers)."""
        found, todo = [], [self.p.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    todo.extend(int(c) for c in task.read_text().split())
                except OSError:
                    pass
        return found

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


def stop_all():
    for proc in reversed(STARTED):
        proc.stop()
    STARTED.clear()


atexit.register(stop_all)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: sys.exit(130))


def cpu_ms(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total * 1000 / CLK_TCK


def rss_mb(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, headers=None, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            urllib.request.urlopen(req, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered at {url}")


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def output(cmd):
    try:
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---- load ------------------------------------------------------------------------------


def body(stream):
    b = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hi to the bench."}]}
    if stream:
        b["stream"] = True
    return json.dumps(b)


def wrk(url, headers, stream, duration, connections):
    script = WORKDIR / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body(stream))}", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout

    def ms(label):
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "p50": ms("50%"),
        "p99": ms("99%"),
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in errors.groups()) if errors else 0),
        "raw": out,
    }


# Latency at a fixed rate (`oha -q`), not only at saturation: a rate every tollgate target
# and bare Envoy sustain with room (the slowest, Envoy on Redis, does about 2,000 req/s), with
# oha's correction for coordinated omission. Peers are measured at saturation only.
FIXED_RATE = 1000
FIXED_RATE_TARGETS = ("envoy-bare", "envoy-floor", "envoy-tollgate", "native", "native-redis", "envoy-redis")


def oha(url, headers, stream, duration, connections=16):
    """p50 and p99 in ms at FIXED_RATE requests per second; None where oha is missing."""
    if shutil.which("oha") is None:
        return None
    cmd = ["oha", "-z", f"{duration}s", "-w", "-q", str(FIXED_RATE), "-c", str(connections), "--latency-correction",
           "--no-tui", "--output-format", "json", "-m", "POST", "-H", "content-type: application/json", "-d", body(stream)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 60).stdout
    try:
        report = json.loads(out)
    except ValueError:
        return None
    codes = report.get("statusCodeDistribution") or {}
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    p = report["latencyPercentiles"]
    return {"p50": p["p50"] * 1000, "p99": p["p99"] * 1000, "errors": sum(codes.values()) - ok
            + sum((report.get("errorDistribution") or {}).values())}


def fixed_rate(url, headers, stream, duration, rounds):
    """`oha` run `rounds` times: the median p50 and the median p99 (one run's p99 moves with
    whatever else the shared machine does in those seconds), errors summed."""
    runs = [r for r in (oha(url, headers, stream, duration) for _ in range(rounds)) if r]
    if not runs:
        return None
    median = lambda q: sorted(r[q] for r in runs)[len(runs) // 2]
    return {"p50": median("p50"), "p99": median("p99"), "errors": sum(r["errors"] for r in runs)}


# ---- targets ---------------------------------------------------------------------------


def sha256(key):
    return hashlib.sha256(key.encode()).hexdigest()


def tollgate_config(mock_port, chain=False, redis_port=None, store_server=None):
    # With `chain`, the model has a fallback on another provider (never used here: the
    # primary answers): what a failover chain costs a request that does not fail over.
    fallback = f"""
  - name: claude
    kind: anthropic
    base_url: http://127.0.0.1:{mock_port}/v1
    keys: [{{ id: c1, secret_env: BENCH_KEY_1 }}]""" if chain else ""
    fallbacks = ", fallbacks: [claude-fallback]" if chain else ""
    fallback_model = "\n  - { name: claude-fallback, provider: claude }" if chain else ""
    # With `redis_port`, limits and key health live on Redis (store.kind: redis).
    # Envoy reaches it through `tollgate store-server` at `store_server`.
    server = f', server: "{store_server}"' if store_server else ""
    store = f"""
store: {{ kind: redis, url: "redis://127.0.0.1:{redis_port}/0", timeout_ms: 200{server} }}""" if redis_port else ""
    return f"""
server: {{ listen: "127.0.0.1:0", max_body_bytes: 1048576, upstream_timeout_ms: 60000 }}{store}
consumers:
  - name: bench
    keys: [{{ sha256: {sha256(CLIENT_KEY)} }}]
    models: ["*"]
    limits: {{ requests_per_minute: 1000000000, tokens_per_minute: 1000000000000 }}
providers:
  - name: upstream
    kind: openai
    base_url: http://127.0.0.1:{mock_port}/v1
    keys:
      - {{ id: k1, secret_env: BENCH_KEY_1 }}
      - {{ id: k2, secret_env: BENCH_KEY_2 }}{fallback}
models:
  - {{ name: gpt-4o-mini, provider: upstream{fallbacks} }}{fallback_model}
"""


TOLLGATE_ENV = {"BENCH_KEY_1": UPSTREAM_KEYS[0], "BENCH_KEY_2": UPSTREAM_KEYS[1], "TOLLGATE_LOG": "error"}


def start_mock():
    proc = Proc("mock", [MOCK, "--no-record", "--workers", "1"], announces=True)
    addr = proc.first_line().removeprefix("listening on ")
    return proc, int(addr.rsplit(":", 1)[1])


def envoy_stat(admin, name):
    try:
        text = urllib.request.urlopen(f"http://{admin}/stats?filter={name}", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + ":"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


class Group:
    """Processes measured together (a gateway and the Redis it needs)."""

    def __init__(self, *procs):
        self.procs = procs

    def pids(self):
        return [pid for p in self.procs for pid in p.pids()]

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
            if p in STARTED:
                STARTED.remove(p)


def start_redis():
    port = free_port()
    proc = Proc("redis", ["redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no"])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start (apt-get install -y redis-server)")


def target_native_redis(mock_port, tollgate=None):
    """The native host with its limits and key health on a local Redis; Redis's CPU counts."""
    tollgate = tollgate or TOLLGATE
    redis, redis_port = start_redis()
    cfg = WORKDIR / "tollgate-redis.yaml"
    cfg.write_text(tollgate_config(mock_port, redis_port=redis_port))
    proc = Proc("native-redis", [tollgate, "run", "--config", cfg, "--listen", "127.0.0.1:0", "--metrics-listen", ""],
                env=TOLLGATE_ENV, announces=True)
    addr = proc.first_line().removeprefix("listening on ")
    group = Group(redis, proc)
    return group, f"http://{addr}/v1/chat/completions", {"Authorization": f"Bearer {CLIENT_KEY}"}, None


def target_native(mock_port, chain=False, tollgate=None):
    tollgate = tollgate or TOLLGATE
    cfg = WORKDIR / "tollgate.yaml"
    cfg.write_text(tollgate_config(mock_port, chain))
    proc = Proc("native", [tollgate, "run", "--config", cfg, "--listen", "127.0.0.1:0"], env=TOLLGATE_ENV, announces=True)
    addr = proc.first_line().removeprefix("listening on ")
    return proc, f"http://{addr}/v1/chat/completions", {"Authorization": f"Bearer {CLIENT_KEY}"}, None


def target_envoy_redis(mock_port):
    """Envoy + tollgate with its limits and key health on a local Redis, through `tollgate
    store-server`; Redis's and the store-server's CPU count."""
    redis, redis_port = start_redis()
    cfg = WORKDIR / "tollgate-store.yaml"
    cfg.write_text(tollgate_config(mock_port, redis_port=redis_port))
    store = Proc("store-server", [TOLLGATE, "store-server", "--config", cfg, "--listen", "127.0.0.1:0"],
                 env=TOLLGATE_ENV, announces=True)
    addr = store.first_line().removeprefix("listening on ")
    envoy, url, headers, admin = target_envoy_tollgate(
        mock_port, config=tollgate_config(mock_port, redis_port=redis_port, store_server=addr))
    return Group(redis, store, envoy), url, headers, admin


def target_envoy_tollgate(mock_port, chain=False, tollgate=None, wasm=None, config=None):
    tollgate, wasm = tollgate or TOLLGATE, wasm or WASM
    cfg = WORKDIR / "tollgate.yaml"
    cfg.write_text(config or tollgate_config(mock_port, chain))
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    bootstrap = WORKDIR / "envoy-tollgate.yaml"
    with open(bootstrap, "w") as f:
        run([tollgate, "envoy-bootstrap", "--config", cfg, "--wasm", wasm, "--listen", f"127.0.0.1:{port}", "--admin", admin],
            stdout=f, env={**os.environ, **TOLLGATE_ENV})
    proc = Proc("envoy-tollgate", [ENVOY, "-c", bootstrap, "--concurrency", WORKERS, "--disable-hot-restart", "--log-level", "error"], env=TOLLGATE_ENV)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, url, {"Authorization": f"Bearer {CLIENT_KEY}"}, admin


FLOOR_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "tollgate_floor.wasm"


def floor_filter(mode):
    """A reference filter of benches/floor in `mode` (its plugin configuration)."""
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": f"floor-{mode}", "root_id": "floor",
            # As tollgate's bootstrap: lets a paused headers callback see the body.
            "allow_on_headers_stop_iteration": True,
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": mode},
            "vm_config": {"vm_id": "floor", "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": str(FLOOR_WASM)}}},
        }}}


def target_envoy_bare(mock_port, floor=None, upstream_noop=False):
    """Bare Envoy; with `floor` ("noop" or "body"), one of the reference filters of
    benches/floor (a wasm filter that does nothing; one that reads the whole body and sets a
    header) before its router; with `upstream_noop`, also the no-op filter in the cluster's
    upstream filters (where tollgate's key role runs, once per attempt)."""
    port, admin = free_port(), free_port()
    filters = [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    if floor:
        filters.insert(0, floor_filter(floor))
    cluster_options = {}
    if upstream_noop:
        cluster_options = {"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [floor_filter("noop"), {
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}],
            }}}
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "bare", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "bare", "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "mock", "timeout": "0s"}}]}]},
                        "http_filters": filters,
                    }}]}],
            }],
            "clusters": [{
                "name": "mock", "type": "STATIC", "connect_timeout": "5s",
                "load_assignment": {"cluster_name": "mock", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": mock_port}}}}]}]},
                **cluster_options,
            }],
        },
    }
    name = (f"envoy-{floor}" if floor else "envoy-bare") + ("-upstream" if upstream_noop else "")
    path = WORKDIR / f"{name}.json"
    path.write_text(json.dumps(bootstrap))
    proc = Proc(name, [ENVOY, "-c", path, "--concurrency", WORKERS, "--disable-hot-restart", "--log-level", "error"])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    return proc, url, {"Authorization": f"Bearer {UPSTREAM_KEYS[0]}"}, None


def target_mock(mock_port):
    return None, f"http://127.0.0.1:{mock_port}/v1/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEYS[0]}"}, None


def install_crabllm():
    binary = PEERS / "crabllm" / "bin" / "crabllm"
    if not binary.exists():
        log(f"installing crabllm {CRABLLM_VERSION} (cargo install, a few minutes)")
        run(["cargo", "install", f"crabllm@{CRABLLM_VERSION}", "--locked", "--root", PEERS / "crabllm"])
    return binary


def target_crabllm(mock_port):
    binary = install_crabllm()
    port = free_port()
    cfg = WORKDIR / "crabllm.toml"
    cfg.write_text(f"""listen = "127.0.0.1:{port}"

[[keys]]
name = "bench"
key = "{CLIENT_KEY}"
models = ["*"]

[providers.openai]
kind = "openai"
api_key = "{UPSTREAM_KEYS[0]}"
base_url = "http://127.0.0.1:{mock_port}/v1"
models = ["gpt-4o-mini"]
max_retries = 0
""")
    proc = Proc("crabllm", [binary, "serve", "--config", cfg])
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    return proc, f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {CLIENT_KEY}"}, None


def install_litellm():
    venv = PEERS / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        log("installing LiteLLM proxy (pip, about a minute)")
        run([sys.executable, "-m", "venv", venv])
        run([venv / "bin" / "pip", "install", "--quiet", "litellm[proxy]"])
    return binary


LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": LITELLM_MASTER,
               "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR"}


def target_litellm(mock_port):
    binary = install_litellm()
    port = free_port()
    cfg = WORKDIR / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: {UPSTREAM_KEYS[0]}
general_settings:
  master_key: {LITELLM_MASTER}
""")
    env = {k: v for k, v in LITELLM_ENV.items()}
    env.pop("DATABASE_URL", None)
    proc = Proc("litellm", [binary, "--config", cfg, "--host", "127.0.0.1", "--port", port, "--num_workers", WORKERS], env=env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return proc, f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {LITELLM_MASTER}"}, None


def install_portkey():
    home = PEERS / "portkey"
    server = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not server.exists():
        log(f"installing the Portkey gateway {PORTKEY_VERSION} (npm)")
        home.mkdir(parents=True, exist_ok=True)
        (home / "package.json").write_text(json.dumps({
            "name": "portkey-bench", "private": True,
            "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
            # Streaming is broken without it (see ../shared/PEERS.md).
            "overrides": {"@hono/node-server": "1.13.8"},
        }))
        run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=home)
    return server


def target_portkey(mock_port):
    server = install_portkey()
    port = free_port()
    proc = Proc("portkey", ["node", server, f"--port={port}", "--headless"], cwd=PEERS / "portkey")
    wait_http(f"http://127.0.0.1:{port}/")
    headers = {
        # Portkey's open-source gateway has no client keys: the caller sends the provider key.
        "Authorization": f"Bearer {UPSTREAM_KEYS[0]}",
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"http://127.0.0.1:{mock_port}/v1",
    }
    return proc, f"http://127.0.0.1:{port}/v1/chat/completions", headers, None


TARGETS = {
    "mock": ("mock provider, direct", target_mock),
    "envoy-bare": (f"bare Envoy ({WORKERS} workers)", target_envoy_bare),
    "envoy-noop": (f"Envoy + a wasm filter that does nothing ({WORKERS} workers)",
                   lambda port: target_envoy_bare(port, floor="noop")),
    "envoy-floor": (f"Envoy + a wasm filter that reads the body, sets a header: the floor ({WORKERS} workers)",
                    lambda port: target_envoy_bare(port, floor="body")),
    "envoy-floor-upstream": (f"the floor + a no-op wasm filter per upstream attempt: the floor of a key picked per attempt ({WORKERS} workers)",
                             lambda port: target_envoy_bare(port, floor="body", upstream_noop=True)),
    "envoy-tollgate": (f"Envoy + tollgate ({WORKERS} workers)", target_envoy_tollgate),
    "native": ("tollgate native host", target_native),
    "envoy-tollgate-chain": (f"Envoy + tollgate, model with a fallback ({WORKERS} workers)",
                             lambda port: target_envoy_tollgate(port, chain=True)),
    "native-chain": ("tollgate native host, model with a fallback", lambda port: target_native(port, chain=True)),
    "native-redis": ("tollgate native host, state on Redis (Redis CPU included)", target_native_redis),
    "envoy-redis": (f"Envoy + tollgate, state on Redis via store-server ({WORKERS} workers; Redis and store-server CPU included)",
                    target_envoy_redis),
    "crabllm": (f"crabllm {CRABLLM_VERSION}", target_crabllm),
    "portkey": (f"Portkey gateway {PORTKEY_VERSION}", target_portkey),
    "litellm": ("LiteLLM proxy", target_litellm),
}


# ---- the run -----------------------------------------------------------------------------


def measure(name, args, mock, mock_port):
    if name.startswith("envoy-floor+"):
        # The floor plus host calls of one kind (benches/floor: `body+<call>*<n>`).
        calls = name.removeprefix("envoy-floor+")
        TARGETS[name] = (f"the floor + host calls {calls} ({WORKERS} workers)",
                         lambda port: target_envoy_bare(port, floor=f"body+{calls}"))
    label, start = TARGETS[name]
    rows = []
    try:
        proc, url, headers, admin = start(mock_port)
    except Exception as e:  # a peer that cannot install or start is reported, not fatal
        log(f"{name}: not measured: {e}")
        return [{"target": label, "case": case, "skipped": str(e)} for case in ("chat", "stream")]
    measured = [mock] if proc is None else [proc]
    for stream in (False, True):
        case = "stream" if stream else "chat"
        wrk(url, headers, stream, 2, args.connections)  # warm up
        rounds = []
        for _ in range(args.rounds):
            pids = [p for m in measured for p in m.pids()]
            cpu0 = cpu_ms(pids)
            r = wrk(url, headers, stream, args.duration, args.connections)
            r["cpu_ms_per_request"] = (cpu_ms(pids) - cpu0) / max(r["requests"], 1)
            r["rss_mb"] = rss_mb(pids)
            rounds.append(r)
        best = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]  # the median round
        if best["requests"] == 0 or best["errors"] > best["requests"] // 100:
            log(f"{name}/{case}: {best['errors']} errors in {best['requests']} requests:\n{best['raw']}")
        row = {"target": label, "case": case, **{k: v for k, v in best.items() if k != "raw"}}
        if admin:
            row["vm_memory_mb"] = (envoy_stat(admin, "wasmcustom.tollgate_vm_memory_bytes") or 0) / 1048576
        if name in FIXED_RATE_TARGETS:
            fixed = fixed_rate(url, headers, stream, args.duration, args.rounds)
            if fixed:
                row["fixed"] = fixed
                log(f"{label:32} {case:6} at {FIXED_RATE} req/s: p50 {fixed['p50']:.3f} ms  p99 {fixed['p99']:.3f} ms")
        rows.append(row)
        log(f"{label:32} {case:6} {best['rps']:10.0f} req/s  p50 {best['p50']} ms  p99 {best['p99']} ms  "
            f"cpu {best['cpu_ms_per_request']:.3f} ms/req  rss {best['rss_mb']:.0f} MB")
    if proc is not None:
        proc.stop()
        if proc in STARTED:
            STARTED.remove(proc)
    return rows


def versions():
    def first_version(text):
        m = re.search(r"\d+\.\d+\.\d+", text)
        return m.group(0) if m else ""

    v = {
        "tollgate": first_version(output([TOLLGATE, "--version"])),
        "Envoy": first_version(output([ENVOY, "--version"]).split("version:")[-1]),
        "wrk": first_version(output(["wrk", "-v"])),
    }
    crab = PEERS / "crabllm" / "bin" / "crabllm"
    if crab.exists():
        v["crabllm"] = first_version(output([crab, "--version"])) or CRABLLM_VERSION
    pip = PEERS / "litellm-venv" / "bin" / "pip"
    if pip.exists():
        show = output([pip, "show", "litellm"])
        v["LiteLLM"] = next((l.split(":", 1)[1].strip() for l in show.splitlines() if l.startswith("Version:")), "")
    if (PEERS / "portkey").exists():
        v["Portkey gateway"] = PORTKEY_VERSION
    v["Node"] = first_version(output(["node", "--version"]))
    return v


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) // 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores ({cpu}), {mem // 1024} GiB RAM, Linux {platform.release()}"


def fmt(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def write_results(rows, args):
    base = {}
    for r in rows:
        if "skipped" not in r and r["target"] in (TARGETS["mock"][0], TARGETS["envoy-bare"][0]):
            base[(r["target"], r["case"])] = r["rps"]
    out = [
        "# Load bench results",
        "",
        "Regenerated by `make bench-load` (benches/load.py); do not edit by hand.",
        "",
        f"- Machine: {machine()}",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `wrk -t1 -c{args.connections} -d{args.duration}s`, "
        f"median of {args.rounds} round(s) after a 2 s warm-up; a small chat completion (`max_tokens: 16`), "
        "streamed and not, against the same mock provider on loopback.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v),
        "- Every gateway authenticates a client key, injects an upstream key and forwards; bare Envoy only "
        "forwards; Portkey's open-source gateway has no client keys (the caller sends the provider key). "
        "tollgate runs with an RPM and a TPM limit on the consumer and a pool of two keys.",
        "- The load generator, the mock and the gateway share the machine's cores: every gateway is CPU-bound, so "
        "compare throughput and CPU per request; latency under load mostly measures queueing.",
        "",
        "| target | case | req/s | × mock | × bare Envoy | p50 ms | p99 ms | gateway CPU ms/req | RSS MB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['target']} | {r['case']} | not measured: {r['skipped'][:80]} | | | | | | | |")
            continue
        mock = base.get((TARGETS["mock"][0], r["case"]))
        bare = base.get((TARGETS["envoy-bare"][0], r["case"]))
        ratio = lambda b: "—" if not b else f"{r['rps'] / b:.2f}"
        out.append(
            f"| {r['target']} | {r['case']} | {fmt(r['rps'])} | {ratio(mock)} | {ratio(bare)} | {fmt(r['p50'], 2)} | "
            f"{fmt(r['p99'], 2)} | {fmt(r['cpu_ms_per_request'], 3)} | {fmt(r['rss_mb'])} | {r['errors']} |"
        )
    fixed = [r for r in rows if r.get("fixed")]
    if fixed:
        bare = {r["case"]: r["fixed"] for r in fixed if r["target"] == TARGETS["envoy-bare"][0]}
        added = lambda r, q: "—" if r["case"] not in bare else f"{r['fixed'][q] - bare[r['case']][q]:+.3f}"
        out += ["", f"Latency at a fixed rate: `oha -q {FIXED_RATE} -c 16 -z {args.duration}s -w --latency-correction` "
                    f"(median p50 and p99 of {args.rounds} round(s); nothing saturated, so this is the time a request spends "
                    "in the gateway, not in queues):",
                "", "| target | case | p50 ms | p99 ms | added p50 ms over bare Envoy | added p99 ms | errors |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in fixed:
            f = r["fixed"]
            out.append(f"| {r['target']} | {r['case']} | {f['p50']:.3f} | {f['p99']:.3f} | {added(r, 'p50')} | "
                       f"{added(r, 'p99')} | {f['errors']} |")
    vm = [r["vm_memory_mb"] for r in rows if r.get("vm_memory_mb")]
    if vm:
        out += ["", f"Wasm VM linear memory per Envoy worker (stat `wasmcustom.tollgate_vm_memory_bytes`): "
                    f"{max(vm):.1f} MB; `.wasm` module: {WASM.stat().st_size / 1024:.0f} KB."]
    Path(args.out).write_text("\n".join(out) + "\n")
    log(f"wrote {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case; the median is kept (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--targets", help=f"comma-separated, from {','.join(TARGETS)} (default: all, and the "
                        "baseline's with --baseline)")
    parser.add_argument("--baseline", metavar="DIR", help="another checkout with release builds (target/release/tollgate, "
                        "the release .wasm): adds targets native@baseline, native-redis@baseline, "
                        "envoy-tollgate@baseline and envoy-tollgate-chain@baseline, to compare two "
                        "builds in one run (e.g. an ablation)")
    parser.add_argument("--out", default=str(RESULTS), help=f"where to write the results (default {RESULTS})")
    args = parser.parse_args()
    if args.baseline:
        base = Path(args.baseline)
        base_bin = base / "target" / "release" / "tollgate"
        base_wasm = base / "target" / "wasm32-wasip1" / "release" / "tollgate_filter.wasm"
        TARGETS["native@baseline"] = ("tollgate native host, baseline build",
                                      lambda port: target_native(port, tollgate=base_bin))
        TARGETS["native-redis@baseline"] = ("tollgate native host, state on Redis, baseline build",
                                            lambda port: target_native_redis(port, tollgate=base_bin))
        TARGETS["envoy-tollgate@baseline"] = (f"Envoy + tollgate, baseline build ({WORKERS} workers)",
                                              lambda port: target_envoy_tollgate(port, tollgate=base_bin, wasm=base_wasm))
        TARGETS["envoy-tollgate-chain@baseline"] = (f"Envoy + tollgate, model with a fallback, baseline build ({WORKERS} workers)",
                                                    lambda port: target_envoy_tollgate(port, chain=True, tollgate=base_bin, wasm=base_wasm))
    for tool, hint in [("wrk", "apt-get install -y wrk"), (ENVOY, "make envoy-install"), (TOLLGATE, "cargo build --release -p tollgate"),
                       (MOCK, "cargo build --release -p tollgate-e2e --bin mock-provider"), (WASM, "make wasm")]:
        if shutil.which(str(tool)) is None and not Path(tool).exists():
            sys.exit(f"missing {tool}: {hint} (or run `make bench-load`)")
    targets = args.targets or ",".join(TARGETS)
    mock, mock_port = start_mock()
    rows = []
    for name in targets.split(","):
        rows += measure(name.strip(), args, mock, mock_port)
    write_results(rows, args)
    shutil.rmtree(WORKDIR, ignore_errors=True)


if __name__ == "__main__":
    main()
