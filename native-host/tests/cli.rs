//! The command-line tools, run as a user runs them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tollgate(args: &[&str], stdin: Option<&str>) -> Output {
    tollgate_with_env(args, stdin, &[])
}

fn tollgate_with_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_accepts_the_default_config() {
    let out = tollgate(&["check", "envoy-config/tollgate.yaml"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (1 consumers, 1 providers, 1 models, 1 prompts)"));
}

#[test]
fn check_lists_every_problem_and_fails() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "providers:\n  - { name: openai, kind: openai, base_url: 'https://api.openai.com/v1', keys: [{ id: k1, secret_env: TOLLGATE_TEST_UNSET_1 }, { id: k2, secret_env: TOLLGATE_TEST_UNSET_2 }] }\nmodels:\n  - { name: m, provider: nope }\n",
    )
    .unwrap();
    let out = tollgate(&["check", path.to_str().unwrap()], None);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("providers[0].keys[0].secret_env: env var TOLLGATE_TEST_UNSET_1 is not set"),
        "{err}"
    );
    assert!(
        err.contains("providers[0].keys[1].secret_env: env var TOLLGATE_TEST_UNSET_2 is not set"),
        "{err}"
    );
    assert!(
        err.contains("models[0].provider: no provider is named `nope`"),
        "{err}"
    );
}

#[test]
fn hash_key_reads_stdin_and_matches_the_demo_key_in_the_default_config() {
    let out = tollgate(&["hash-key"], Some("tg-demo-key\n"));
    assert!(out.status.success());
    let hash = text(&out.stdout).trim().to_string();
    assert_eq!(hash.len(), 64);
    let config = std::fs::read_to_string(workspace().join("envoy-config/tollgate.yaml")).unwrap();
    assert!(
        config.contains(&hash),
        "the README's demo key must open the default config"
    );
    let out = tollgate(&["hash-key"], Some("\n"));
    assert!(!out.status.success());
}

#[test]
fn new_key_prints_a_key_and_its_hash() {
    let out = tollgate(&["new-key"], None);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim();
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sha256:"))
        .unwrap()
        .trim();
    assert!(key.starts_with("tg-") && key.len() == 51, "{key}");
    let again = tollgate(&["hash-key"], Some(key));
    assert_eq!(text(&again.stdout).trim(), hash);
    assert_ne!(
        text(&tollgate(&["new-key"], None).stdout),
        stdout,
        "keys are random"
    );
}

/// The committed bootstraps are renderings of the default and example configs: they must
/// not go stale.
#[test]
fn committed_envoy_bootstraps_are_up_to_date() {
    let local_wasm = "target/wasm32-wasip1/release/tollgate_filter.wasm";
    // The example pool names its keys' variables; rendering needs them set, not their values.
    let pool_env = [
        ("OPENAI_KEY_1", "unused"),
        ("OPENAI_KEY_2", "unused"),
        ("OPENAI_KEY_BATCH", "unused"),
    ];
    for (file, config, wasm, listen, admin) in [
        (
            "envoy-config/envoy.yaml",
            "envoy-config/tollgate.yaml",
            local_wasm,
            "127.0.0.1:10000",
            "127.0.0.1:9901",
        ),
        (
            "envoy-config/envoy-docker.yaml",
            "envoy-config/tollgate.yaml",
            "/etc/tollgate/tollgate_filter.wasm",
            "0.0.0.0:10000",
            "0.0.0.0:9901",
        ),
        (
            "envoy-config/openai-pool.envoy.yaml",
            "envoy-config/openai-pool.yaml",
            local_wasm,
            "127.0.0.1:10000",
            "127.0.0.1:9901",
        ),
    ] {
        let out = tollgate_with_env(
            &[
                "envoy-bootstrap",
                "--config",
                config,
                "--wasm",
                wasm,
                "--listen",
                listen,
                "--admin",
                admin,
            ],
            None,
            &pool_env,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let committed = std::fs::read_to_string(workspace().join(file)).unwrap();
        assert!(
            text(&out.stdout) == committed,
            "{file} is stale: run `make envoy-config`"
        );
    }
}

/// With `store.kind: redis`, Envoy commits its shared state through `tollgate store-server`:
/// the bootstrap needs `store.server` and routes to it through the `tollgate_store` cluster
/// (in the bootstrap, or in cds.yaml with `--xds-dir`).
#[test]
fn envoy_bootstrap_on_redis_renders_the_store_server_cluster() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let example =
        std::fs::read_to_string(workspace().join("envoy-config/tollgate-redis.yaml")).unwrap();
    assert!(example.contains("server: 127.0.0.1:7379"), "{example}");
    let render = |config: &str, xds: Option<&Path>| {
        let path = dir.join("tollgate.yaml");
        std::fs::write(&path, config).unwrap();
        let mut args = vec![
            "envoy-bootstrap",
            "--config",
            path.to_str().unwrap(),
            "--wasm",
            "/tollgate_filter.wasm",
        ];
        if let Some(xds) = xds {
            args.extend(["--xds-dir", xds.to_str().unwrap()]);
        }
        tollgate(&args, None)
    };
    let out = render(&example, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bootstrap: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let clusters = bootstrap["static_resources"]["clusters"]
        .as_sequence()
        .unwrap();
    let store = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some("tollgate_store"))
        .expect("a tollgate_store cluster");
    assert_eq!(store["type"].as_str(), Some("STATIC"));
    assert_eq!(store["connect_timeout"].as_str(), Some("0.05s"));
    let address = &store["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    assert_eq!(address["address"].as_str(), Some("127.0.0.1"));
    assert_eq!(address["port_value"].as_u64(), Some(7379));
    let http = &store["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"];
    assert!(
        http.get("http_protocol_options").is_some(),
        "HTTP/1: {http:?}"
    );

    let xds = dir.join("xds");
    std::fs::create_dir_all(&xds).unwrap();
    let out = render(&example, Some(&xds));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cds = std::fs::read_to_string(xds.join("cds.yaml")).unwrap();
    assert!(cds.contains("name: tollgate_store"), "{cds}");

    let without_server = example.replace("server: 127.0.0.1:7379", "");
    let out = render(&without_server, None);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("store.server"),
        "{}",
        text(&out.stderr)
    );
}

/// `tollgate store-server` needs a Redis store and an address to listen on.
#[test]
fn store_server_refuses_a_config_it_cannot_serve() {
    let out = tollgate(
        &["store-server", "--config", "envoy-config/tollgate.yaml"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("store.kind: redis"),
        "{}",
        text(&out.stderr)
    );
    let dir = std::env::temp_dir().join(format!("tollgate-cli-nolisten-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::fs::read_to_string(workspace().join("envoy-config/tollgate-redis.yaml"))
        .unwrap()
        .replace("server: 127.0.0.1:7379", "");
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, example).unwrap();
    let out = tollgate(&["store-server", "--config", path.to_str().unwrap()], None);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--listen"),
        "{}",
        text(&out.stderr)
    );
}
