use super::*;

fn read(text: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml(text, Path::new("/etc/dcache/server.toml"))
}

/// Settings with every option away from its default, optional ones given.
fn everything() -> Settings {
    Settings {
        listen: vec![
            "tcp://0.0.0.0:4000".parse().unwrap(),
            "unix:///run/dcache.sock".parse().unwrap(),
        ],
        listen_distcc: vec!["tcp://127.0.0.1:3632".parse().unwrap()],
        cache_dir: Some("/var/cache/dcache".into()),
        cache_size: Size(20 << 30),
        store_compression: "zstd:3".parse().unwrap(),
        jobs: Some(7),
        allow_compiler: vec!["gcc-12".into()],
        compiler_path: "/opt/bin:/usr/bin".into(),
        allow: vec!["10.1.0.0/16".parse().unwrap()],
        token_file: Some("/etc/dcache/token".into()),
        tls_cert: Some("/etc/dcache/cert.pem".into()),
        tls_key: Some("/etc/dcache/key.pem".into()),
        tls_client_ca: Some("/etc/dcache/ca.pem".into()),
        insecure_no_sandbox: true,
        sandbox_path: vec!["/opt/toolchain".into()],
        sandbox_launcher: Some("/usr/libexec/dcache-sandbox".into()),
        limit_memory: Size(2 << 30),
        limit_output: Size(100 << 20),
        limit_time: 60,
        limit_stderr: Size(512 << 10),
        limit_spool: Size(1 << 30),
        min_upload_rate: Size(1536),
        handshake_timeout: 5,
        stall_timeout: 30,
        idle_timeout: 120,
        max_handshaking: 32,
        max_connections_per_address: 8,
        shared: Some("redis://10.0.0.9:6379/0".into()),
        shared_key_file: Some("/etc/dcache/shared.key".into()),
        shared_ttl: 3600,
        shared_max_value: Size(8 << 20),
        shared_deadline: 100,
        upstream: vec!["tcp://10.0.0.7:3633".parse().unwrap()],
        upstream_token_file: Some("/etc/dcache/upstream.token".into()),
        upstream_backoff: 30,
        upstream_compress: UpstreamCompress::Always,
        metrics: Some("tcp://127.0.0.1:9633".parse().unwrap()),
        metrics_allow: vec!["10.2.0.0/16".parse().unwrap()],
        verbose: 2,
        log_format: LogFormat::Json,
    }
}

#[test]
fn every_setting_round_trips_through_toml() {
    let all = everything();
    let text = all.to_toml().unwrap();
    assert_eq!(read(&text).unwrap(), all, "{text}");
    assert!(text.contains("cache_size = \"20G\""), "{text}");
    assert!(text.contains("min_upload_rate = \"1536\""), "{text}");
    let defaults = Settings::default().to_toml().unwrap();
    assert_eq!(read(&defaults).unwrap(), Settings::default(), "{defaults}");
    assert!(
        !defaults.contains("token_file"),
        "absent options stay absent"
    );
}

#[test]
fn an_empty_file_is_the_defaults_and_keys_override_them() {
    assert_eq!(read("").unwrap(), Settings::default());
    let s = read("# a comment\ncache_size = \"2G\"\njobs = 3\nallow = [\"10.0.0.0/8\"]\n").unwrap();
    assert_eq!(s.cache_size, Size(2 << 30));
    assert_eq!(s.jobs, Some(3));
    assert_eq!(s.allow, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
    assert!(s.beyond_loopback());
    assert_eq!(s.limit_time, 300);
    // An integer size is bytes.
    assert_eq!(read("cache_size = 4096").unwrap().cache_size, Size(4096));
}

#[test]
fn an_unknown_key_names_the_file_the_line_and_the_key() {
    let e = read("cache_size = \"1G\"\n\ncache_sise = \"2G\"\n").unwrap_err();
    assert!(
        matches!(&e, ConfigError::UnknownKey { line: 3, key, .. } if key == "cache_sise"),
        "{e:?}"
    );
    let m = e.to_string();
    assert!(
        m.starts_with("/etc/dcache/server.toml:3: unknown key `cache_sise`"),
        "{m}"
    );
    assert!(m.contains("cache_size"), "the known keys are listed: {m}");
}

#[test]
fn a_value_of_the_wrong_type_names_the_key_and_what_was_expected() {
    let e = read("listen = [\"tcp://127.0.0.1:1\"]\njobs = \"four\"\n").unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(&e, ConfigError::Value { line: 2, key, .. } if key == "jobs"),
        "{e:?}"
    );
    assert!(
        m.starts_with("/etc/dcache/server.toml:2: key `jobs`:"),
        "{m}"
    );
    assert!(m.contains("expected"), "{m}");

    let m = read("cache_size = true").unwrap_err().to_string();
    assert!(
        m.contains("key `cache_size`") && m.contains("a size such as"),
        "{m}"
    );
    let m = read("cache_size = \"10Q\"").unwrap_err().to_string();
    assert!(
        m.contains("key `cache_size`") && m.contains("unknown unit"),
        "{m}"
    );
    let m = read("listen = \"tcp://127.0.0.1:1\"")
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("key `listen`") && m.contains("expected a sequence"),
        "{m}"
    );
    let m = read("allow = [\"10.0.0.0/40\"]").unwrap_err().to_string();
    assert!(
        m.contains("key `allow") && m.contains("not an address range"),
        "{m}"
    );
    let m = read("log_format = \"xml\"").unwrap_err().to_string();
    assert!(m.contains("key `log_format`") && m.contains("json"), "{m}");
    let m = read("limit_time = -1").unwrap_err().to_string();
    assert!(m.contains("key `limit_time`"), "{m}");
}

#[test]
fn malformed_toml_names_the_file_and_the_line() {
    let m = read("jobs = 2\ncache_size = \n").unwrap_err().to_string();
    assert!(
        m.starts_with("/etc/dcache/server.toml:2: not valid TOML"),
        "{m}"
    );
}

#[test]
fn a_missing_or_huge_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let e = Settings::from_file(&missing).unwrap_err();
    assert!(e.to_string().contains("none.toml"), "{e}");
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, "#".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
    assert!(matches!(
        Settings::from_file(&huge),
        Err(ConfigError::TooLarge { .. })
    ));
}

#[test]
fn settings_that_need_each_other_are_checked_together() {
    let mut s = Settings::default();
    assert!(s.validate().is_ok());
    s.tls_cert = Some("c.pem".into());
    let m = s.validate().unwrap_err().to_string();
    assert!(m.contains("tls_cert") && m.contains("tls_key"), "{m}");
    s.tls_key = Some("k.pem".into());
    assert!(s.validate().is_ok());
    s.shared = Some("redis://127.0.0.1:1".into());
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("shared_key_file")
    );
    let mut s = Settings::default();
    s.listen.clear();
    assert!(s.validate().is_err());
}

#[test]
fn settings_become_the_service_and_exec_limits() {
    let all = everything();
    let c = all.service_config();
    assert_eq!(c.compile_slots, 7);
    assert_eq!(c.allow, all.allow);
    assert_eq!(c.protocol.handshake_timeout, Duration::from_secs(5));
    assert_eq!(c.protocol.stall_timeout, Duration::from_secs(30));
    assert_eq!(c.protocol.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.min_upload_rate, 1536);
    assert_eq!(c.max_handshaking, 32);
    assert_eq!(c.max_connections_per_address, 8);
    assert_eq!(c.spool_disk_budget, 1 << 30);
    let l = all.exec_limits();
    assert_eq!(l.resources.address_space, 2 << 30);
    assert_eq!(l.resources.file_size, 100 << 20);
    assert_eq!(l.resources.cpu_seconds, 60);
    assert_eq!(l.max_stderr, 512 << 10);
    let sh = all.shared_config();
    assert_eq!(sh.ttl, Duration::from_secs(3600));
    assert_eq!(sh.max_value, 8 << 20);
    assert_eq!(sh.deadline, Duration::from_millis(100));
    // Zero times are one: a zero timeout would end every connection at once.
    let s = Settings {
        idle_timeout: 0,
        ..Settings::default()
    };
    assert_eq!(
        s.service_config().protocol.idle_timeout,
        Duration::from_secs(1)
    );
}

#[test]
fn upstream_compression_auto_offers_it_across_a_network_only() {
    let far: Address = "tls://farm.example:3633".parse().unwrap();
    let near: Address = "tcp://127.0.0.1:3633".parse().unwrap();
    let level = Some(dcache_proto::DEFAULT_LEVEL);
    assert_eq!(UpstreamCompress::Auto.level_for(&far), level);
    assert_eq!(UpstreamCompress::Auto.level_for(&near), None);
    assert_eq!(UpstreamCompress::Always.level_for(&near), level);
    assert_eq!(UpstreamCompress::Never.level_for(&far), None);
    assert_eq!("always".parse(), Ok(UpstreamCompress::Always));
    assert!("sometimes".parse::<UpstreamCompress>().is_err());
}
