use super::*;
use crate::auth::KeyHash;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_KEY_1" => Some("sk-one".into()),
        "EMPTY" => Some("  ".into()),
        _ => None,
    }
}

fn sample() -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:9090
consumers:
  - name: team-a
    keys: [{{ sha256: {} }}]
    models: ["gpt-*"]
  - name: team-b
    keys: [{{ sha256: {} }}]
    models: ["*"]
providers:
  - name: openai
    kind: openai
    base_url: https://api.openai.com/v1
    keys: [{{ id: k1, secret_env: OPENAI_KEY_1 }}]
  - name: mock
    kind: mock
models:
  - {{ name: gpt-4o-mini, provider: openai }}
  - {{ name: fast, provider: openai, upstream_model: gpt-4o-mini-2024-07-18 }}
  - {{ name: mock-gpt, provider: mock }}
"#,
        KeyHash::of("key-a").to_hex(),
        KeyHash::of("key-b").to_hex()
    )
}

#[test]
fn a_valid_config_compiles() {
    let c = Config::load(&sample(), &env).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:9090");
    assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(c.providers().len(), 2);
    let fast = c.model(c.model_id("fast").unwrap()).unwrap();
    assert_eq!(fast.upstream_model, "gpt-4o-mini-2024-07-18");
    let a = c.consumer(c.authenticate("key-a").unwrap()).unwrap();
    assert_eq!(a.name, "team-a");
    assert!(a.may_use(c.model_id("gpt-4o-mini").unwrap()));
    assert!(!a.may_use(c.model_id("fast").unwrap()));
    assert!(c.authenticate("key-c").is_none());
    let list: serde_json::Value = serde_json::from_slice(a.models_list()).unwrap();
    let ids: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini"]);
}

#[test]
fn json_works_as_well_as_yaml() {
    let yaml = Config::load(&sample(), &env).unwrap();
    let doc: serde_json::Value = serde_yaml::from_str(&sample()).unwrap();
    let json = Config::load(&doc.to_string(), &env).unwrap();
    // Maps iterate in random order, so compare the ordered parts.
    assert_eq!(
        format!("{:?}", yaml.models()),
        format!("{:?}", json.models())
    );
    assert_eq!(
        format!("{:?}", yaml.providers()),
        format!("{:?}", json.providers())
    );
    assert_eq!(
        format!("{:?}", yaml.consumers()),
        format!("{:?}", json.consumers())
    );
    assert_eq!(json.authenticate("key-b"), Some(1));
}

#[test]
fn an_empty_document_is_a_config_with_nothing_in_it() {
    let c = Config::load("", &env).unwrap();
    assert!(c.providers().is_empty() && c.consumers().is_empty());
}

#[test]
fn every_error_is_reported_at_once_with_its_path() {
    let text = r#"
server: { listen: "nowhere", max_body_bytes: 0, colour: blue }
consumers:
  - name: a
    keys: [{ sha256: nothex }]
    models: [gpt-9*]
    modles: []
  - name: "a b"
    keys: []
providers:
  - name: openai
    kind: openai
    base_url: ftp://x
    keys:
      - { id: k1, secret_env: OPENAI_KEY_2 }
      - { id: k1, secret_env: EMPTY }
  - name: other
    kind: gemini
  - name: mock
    kind: mock
    base_url: http://x
  - { name: "bad name", kind: openai }
models:
  - { name: m, provider: nope }
  - { name: x, provider: mock, extra: 1 }
extras: 1
"#;
    let errs = Config::load(text, &env).unwrap_err();
    let rendered = errs.to_string();
    let expect = [
        "extras: unknown section",
        "server.colour: unknown field `colour`",
        "consumers[0].modles: unknown field `modles`",
        "providers[0].base_url: `ftp://x` must start with http:// or https://",
        "providers[0].keys[0].secret_env: env var OPENAI_KEY_2 is not set",
        "providers[0].keys[1].id: key id `k1` is used twice",
        "providers[0].keys[1].secret_env: env var EMPTY is empty",
        "providers[1].kind: unknown kind `gemini`",
        "providers[2].base_url: the mock provider",
        "providers[3].name: `bad name` must be",
        "providers[3].base_url: is required for kind `openai`",
        "models[0].provider: no provider is named `nope`",
        "models[1].extra: unknown field `extra`",
        "consumers[1].name: `a b` must be",
    ];
    for e in expect {
        assert!(rendered.contains(e), "missing `{e}` in:\n{rendered}");
    }
    // An element that fails to parse is reported once and skipped, so its other values
    // (`listen`, the consumer's bad hash) are not reported on top.
    assert_eq!(errs.0.len(), expect.len(), "{rendered}");
}

#[test]
fn server_values_are_checked() {
    let errs = Config::load(
        "server: { listen: nowhere, max_body_bytes: 0, upstream_timeout_ms: 0 }",
        &env,
    )
    .unwrap_err();
    let paths: Vec<_> = errs.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "server.listen",
            "server.max_body_bytes",
            "server.upstream_timeout_ms"
        ]
    );
}

#[test]
fn consumer_key_hashes_and_model_patterns_are_checked() {
    let h = KeyHash::of("k").to_hex();
    let text = format!(
        r#"
providers: [{{ name: mock, kind: mock }}]
models: [{{ name: m, provider: mock }}]
consumers:
  - {{ name: a, keys: [{{ sha256: "{h}" }}, {{ sha256: "12" }}], models: [m, "zz*"] }}
  - {{ name: b, keys: [{{ sha256: "{h}" }}], models: [] }}
"#
    );
    let errs = Config::load(&text, &env).unwrap_err();
    let rendered = errs.to_string();
    assert!(
        rendered.contains("consumers[0].keys[1].sha256: must be 64 hex digits"),
        "{rendered}"
    );
    assert!(
        rendered.contains("consumers[0].models[1]: `zz*` matches no model"),
        "{rendered}"
    );
    assert!(
        rendered.contains("consumers[1].keys[0].sha256: this key hash is listed twice"),
        "{rendered}"
    );
    assert_eq!(errs.0.len(), 3, "{rendered}");
}

#[test]
fn yaml_syntax_errors_are_reported() {
    let errs = Config::load("consumers: [", &env).unwrap_err();
    assert!(errs.to_string().contains("not valid YAML or JSON"));
    let errs = Config::load("[1, 2]", &env).unwrap_err();
    assert!(errs.to_string().contains("must be a mapping"));
}

#[test]
fn secrets_do_not_appear_in_debug_output() {
    let c = Config::load(&sample(), &env).unwrap();
    assert!(!format!("{c:?}").contains("sk-one"));
}

#[test]
fn globs() {
    assert!(glob_match("*", ""));
    assert!(glob_match("*", "anything"));
    assert!(glob_match("gpt-*", "gpt-4o"));
    assert!(!glob_match("gpt-*", "claude"));
    assert!(glob_match("*-mini", "gpt-4o-mini"));
    assert!(glob_match("a*b*c", "aXXbYYc"));
    assert!(!glob_match("a*b*c", "aXXbYY"));
    assert!(glob_match("exact", "exact"));
    assert!(!glob_match("exact", "exactly"));
}

#[test]
fn an_anthropic_provider_has_its_defaults_and_prices_cache_writes() {
    let text = r#"
providers:
  - { name: claude, kind: anthropic, keys: [{ id: c1, secret_env: OPENAI_KEY_1 }] }
  - { name: pinned, kind: anthropic, base_url: "http://127.0.0.1:9/v1", anthropic_version: "2024-01-01" }
  - { name: openai, kind: openai, base_url: "https://api.openai.com/v1", anthropic_version: "2023-06-01" }
models:
  - { name: claude-sonnet, provider: claude, pricing: { input_per_million: 3.0, output_per_million: 15.0, cached_input_per_million: 0.3 } }
  - { name: gpt, provider: openai, pricing: { input_per_million: 2.0, output_per_million: 8.0 } }
"#;
    let errors = Config::load(text, &env).unwrap_err();
    let messages: Vec<String> = errors.to_string().lines().map(str::to_string).collect();
    assert_eq!(
        messages,
        ["providers[2].anthropic_version: only a provider of kind `anthropic` takes it, not `openai`"],
        "{messages:?}"
    );
    let config = Config::load(
        &text.replace(", anthropic_version: \"2023-06-01\" }", " }"),
        &env,
    )
    .expect("valid");
    let claude = config.provider_by_name("claude").unwrap();
    let base = claude.base_url.as_ref().unwrap();
    assert_eq!(base.host, "api.anthropic.com");
    assert_eq!(base.path_prefix, "/v1");
    assert_eq!(claude.anthropic_version, "2023-06-01");
    assert_eq!(
        config.provider_by_name("pinned").unwrap().anthropic_version,
        "2024-01-01"
    );
    // Cache writes cost 1.25× input at Anthropic unless the config says otherwise.
    let sonnet = config
        .model(config.model_id("claude-sonnet").unwrap())
        .unwrap();
    let p = sonnet.pricing.unwrap();
    assert_eq!(p.cache_write, 3.75);
    // 1,000 prompt tokens of which 600 read from the cache and 100 written to it; 100 out.
    assert_eq!(
        p.micro_usd(1_000, 600, 100, 100),
        300 * 3 + 180 + 375 + 1_500
    );
    let gpt = config.model(config.model_id("gpt").unwrap()).unwrap();
    assert_eq!(gpt.pricing.unwrap().cache_write, 2.0);
}

#[test]
fn fallback_chains_are_linked_and_checked() {
    let chains = |fallbacks: &str, attempts: u32| {
        format!(
            r#"
providers:
  - {{ name: openai, kind: openai, base_url: "http://127.0.0.1:9", retry: {{ attempts: {attempts} }}, keys: [{{ id: k1, secret_env: OPENAI_KEY_1 }}] }}
models:
  - {{ name: smart, provider: openai, fallbacks: {fallbacks} }}
  - {{ name: cheap, provider: openai }}
  - {{ name: other, provider: openai }}
"#
        )
    };
    let c = Config::load(&chains("[cheap, other]", 3), &env).unwrap();
    let smart = c.model(c.model_id("smart").unwrap()).unwrap();
    let names: Vec<_> = smart
        .fallbacks
        .iter()
        .map(|&m| c.model(m).unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["cheap", "other"]);
    for (fallbacks, attempts, path, says) in [
        (
            "[nope]",
            3,
            "models[0].fallbacks[0]",
            "no model is named `nope`",
        ),
        ("[smart]", 3, "models[0].fallbacks[0]", "cannot loop"),
        ("[cheap, cheap]", 3, "models[0].fallbacks[1]", "cannot loop"),
        (
            "[cheap, other]",
            2,
            "models[0].fallbacks",
            "retry.attempts is 2",
        ),
    ] {
        let errs = Config::load(&chains(fallbacks, attempts), &env).unwrap_err();
        assert_eq!(errs.0[0].path, path, "{errs}");
        assert!(errs.0[0].message.contains(says), "{errs}");
    }
}

#[test]
fn a_redis_store_is_read_and_checked() {
    let text = |store: &str| {
        format!(
            "store: {store}\nconsumers: [{{ name: a, keys: [{{ sha256: {} }}], models: [m] }}]\nproviders: [{{ name: p, kind: mock }}]\nmodels: [{{ name: m, provider: p }}]\n",
            KeyHash::of("k").to_hex()
        )
    };
    let with_password = |name: &str| (name == "REDIS_PW").then(|| "s3cret".to_string());
    let c = Config::load(
        &text("{ kind: redis, url: \"redis://127.0.0.1:6379/0\", password_env: REDIS_PW, on_failure: local, replicas: 3 }"),
        &with_password,
    )
    .unwrap();
    let store::StoreSettings::Redis(redis) = &c.store else {
        panic!("{:?}", c.store)
    };
    assert_eq!(redis.timeout_ms, 50);
    assert_eq!(redis.on_failure, store::OnFailure::Local);
    assert_eq!(
        (redis.replicas, redis.password.as_deref()),
        (3, Some("s3cret"))
    );
    assert!(
        !format!("{:?}", c.store).contains("s3cret"),
        "the password is redacted"
    );
    assert_eq!(
        Config::load(&text("{}"), &env).unwrap().store,
        store::StoreSettings::Local
    );
    let errors = Config::load(
        &text("{ kind: redis, url: \"redis://user:pw@h:6379\", on_failure: maybe, timeout_ms: 0, password_env: MISSING }"),
        &env,
    )
    .unwrap_err()
    .to_string();
    for wanted in [
        "store.url",
        "store.on_failure",
        "store.timeout_ms",
        "store.password_env",
    ] {
        assert!(errors.contains(wanted), "no {wanted} in {errors}");
    }
    assert!(Config::load(&text("{ kind: memcached }"), &env)
        .unwrap_err()
        .to_string()
        .contains("store.kind"));
}

#[test]
fn a_redis_store_names_its_store_server_for_envoy() {
    let text = |store: &str| {
        format!(
            "store: {store}\nconsumers: [{{ name: a, keys: [{{ sha256: {} }}], models: [m] }}]\nproviders: [{{ name: p, kind: mock }}]\nmodels: [{{ name: m, provider: p }}]\n",
            KeyHash::of("k").to_hex()
        )
    };
    let redis = |server: &str| {
        text(&format!(
            "{{ kind: redis, url: \"redis://127.0.0.1:6379/0\"{server} }}"
        ))
    };
    let settings = |text: &str| match Config::load(text, &env).unwrap().store {
        store::StoreSettings::Redis(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(settings(&redis("")).server, None, "optional");
    for addr in ["127.0.0.1:7379", "[::1]:7379", "0.0.0.0:0"] {
        let s = settings(&redis(&format!(", server: \"{addr}\"")));
        assert_eq!(s.server.as_deref(), Some(addr));
        assert!(format!("{s:?}").contains(addr), "in Debug");
    }
    for bad in [
        "localhost:7379",
        "127.0.0.1",
        "127.0.0.1:99999",
        "http://127.0.0.1:7379",
        "",
    ] {
        let errs = Config::load(&redis(&format!(", server: \"{bad}\"")), &env).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{bad}: {errs}");
        assert_eq!(errs.0[0].path, "store.server", "{bad}: {errs}");
    }
    let errs =
        Config::load(&text("{ kind: local, server: \"127.0.0.1:7379\" }"), &env).unwrap_err();
    assert_eq!(errs.0[0].path, "store.server", "{errs}");
    assert!(errs.0[0].message.contains("kind: redis"), "{errs}");
}

#[test]
fn a_local_share_divides_every_limit_and_counts_apart() {
    let text = format!(
        r#"
consumers:
  - name: a
    keys: [{{ sha256: {} }}]
    models: [m]
    limits: {{ requests_per_minute: 10, concurrency: 3, daily_tokens: 100 }}
providers: [{{ name: p, kind: mock }}]
models: [{{ name: m, provider: p, limits: {{ tokens_per_minute: 2 }} }}]
"#,
        KeyHash::of("k").to_hex()
    );
    let whole = Config::load(&text, &env).unwrap();
    let mut share = Config::load(&text, &env).unwrap();
    share.divide_limits(3);
    let values = |c: &Config| -> Vec<(String, u64)> {
        c.all_limits()
            .map(|l| {
                let v = match l.meter {
                    Meter::Rate(r) => r.limit,
                    Meter::Quota(q) => q.limit,
                    Meter::Concurrency(c) => c.max,
                };
                (l.name.to_string(), v)
            })
            .collect()
    };
    assert_eq!(
        values(&share),
        [
            ("requests_per_minute".to_string(), 3),
            ("concurrency".to_string(), 1),
            ("daily_tokens".to_string(), 33),
            // Never below one.
            ("tokens_per_minute".to_string(), 1),
        ]
    );
    for (w, s) in whole.all_limits().zip(share.all_limits()) {
        assert_ne!(w.store_key, s.store_key, "the share counts apart");
    }
}
