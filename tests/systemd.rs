//! The systemd units in `systemd/` are read by nothing but systemd on a deployed node, and systemd
//! forgives mistakes: a misspelt directive is logged as "Unknown key ..., ignoring" and the daemon
//! starts anyway, without that protection or restart rule. These tests catch such mistakes here:
//! they run `systemd-analyze verify` on each unit (its ExecStart pointed at the freshly built
//! binary), check that the settings the daemon relies on are present and that none of the sandboxing
//! that breaks CUDA crept in, and check that the sysusers.d file creates the account the units use.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the units expect the installed binary; the verify tests substitute the built one.
const INSTALLED_BINARY: &str = "/usr/local/bin/impasto";

/// What ExecStart= must begin with in both units.
const SERVE: &str = "/usr/local/bin/impasto serve --config /etc/impasto/impasto.toml";

/// Settings both units must have, with their values (booleans in any of systemd's spellings).
const REQUIRED: &[(&str, &str)] = &[
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("Restart", "on-failure"),
    ("RestartPreventExitStatus", "2"),
    ("KillMode", "mixed"),
    ("User", "impasto"),
    ("Group", "impasto"),
    ("StateDirectory", "impasto"),
    ("ProtectSystem", "strict"),
    ("ReadWritePaths", "/srv/impasto"),
    ("RequiresMountsFor", "/srv/impasto"),
    ("NoNewPrivileges", "yes"),
    ("PrivateTmp", "yes"),
    ("DevicePolicy", "closed"),
];

/// Settings both units must have with some value other than zero (durations are tuned per site).
const PRESENT: &[&str] = &["WatchdogSec", "TimeoutStopSec", "DeviceAllow"];

/// Settings that must not have these values: each breaks CUDA or the dedicated account.
const FORBIDDEN: &[(&str, &str)] = &[
    ("MemoryDenyWriteExecute", "yes"), // CUDA JIT-compiles kernels into writable, executable memory
    ("PrivateDevices", "yes"),         // hides /dev/nvidia*
    ("ProcSubset", "pid"),             // hides /proc/driver/nvidia
    ("DynamicUser", "yes"),            // the job store belongs to the `impasto` account
];

/// A unit file in `systemd/` and the unit name `systemd-analyze verify` loads it as.
struct Unit {
    file: &'static str,
    verify_as: &'static str,
}

/// The daemon for the whole machine.
const SERVICE: Unit = Unit { file: "impasto.service", verify_as: "impasto.service" };

/// The per-GPU template; verify needs an instance of it, whose file it finds by the template name.
const TEMPLATE: Unit = Unit { file: "impasto@.service", verify_as: "impasto@0.service" };

/// The live-stream template; its instance's settings come from an environment file.
const STREAM: Unit = Unit { file: "impasto-stream@.service", verify_as: "impasto-stream@studio.service" };

/// What `systemd-analyze verify` made of one unit.
struct Verdict {
    success: bool,
    /// The stderr lines that name the unit (lines about the host's own units are left out).
    complaints: Vec<String>,
    stderr: String,
}

/// The path of a file in the repository's `systemd/` folder.
fn shipped(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(file)
}

/// The text of a unit file as shipped.
fn unit_text(unit: &Unit) -> String {
    let path = shipped(unit.file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `text` with ExecStart= running the binary under test instead of the installed one.
fn with_test_binary(text: &str) -> String {
    assert!(text.contains(INSTALLED_BINARY), "the unit does not run {INSTALLED_BINARY}");
    text.replace(INSTALLED_BINARY, &exec_word(env!("CARGO_BIN_EXE_impasto")))
}

/// `path` as one ExecStart= word: `%` doubled (it starts a specifier), quoted if it holds blanks.
fn exec_word(path: &str) -> String {
    let escaped = path.replace('%', "%%");
    if escaped.contains(char::is_whitespace) { format!("\"{escaped}\"") } else { escaped }
}

/// Runs a systemd tool with its log going to stderr at warning level and above; a missing tool
/// fails the test, pointing at the setup script, since a skipped check would pass silently.
fn systemd_tool(program: &str, args: &[&OsStr]) -> Output {
    let output = Command::new(program)
        .args(args)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env_remove("SYSTEMD_UNIT_PATH")
        .output();
    match output {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("{program} is not installed: run scripts/setup.sh, which installs it (Debian package systemd)")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Saves `text` as the unit's file in a fresh directory and runs `systemd-analyze verify` on it.
/// `--recursive-errors=no`: the exit status answers for this unit only, not the host's units it
/// pulls in; `--man=no`: no man pages to look up on a build machine.
fn verify(unit: &Unit, text: &str) -> Verdict {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(unit.file);
    fs::write(&file, text).unwrap();
    // systemd warns about unit files that are executable or world-writable, whatever the umask.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let target = dir.path().join(unit.verify_as);
    let args: [&OsStr; 4] =
        ["verify".as_ref(), "--recursive-errors=no".as_ref(), "--man=no".as_ref(), target.as_os_str()];
    let output = systemd_tool("systemd-analyze", &args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let complaints = stderr
        .lines()
        .filter(|line| line.contains(unit.file) || line.contains(unit.verify_as))
        .map(str::to_owned)
        .collect();
    Verdict { success: output.status.success(), complaints, stderr }
}

/// Asserts that `systemd-analyze verify` accepts the shipped unit and has nothing to say about it.
fn assert_verifies(unit: &Unit) {
    let verdict = verify(unit, &with_test_binary(&unit_text(unit)));
    assert!(
        verdict.success && verdict.complaints.is_empty(),
        "systemd-analyze verify rejects {} (exit success: {}); lines about it: {:#?}\nstderr:\n{}",
        unit.file,
        verdict.success,
        verdict.complaints,
        verdict.stderr
    );
}

/// The `Key=value` settings of a unit file in order, without comments or section headers.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// Every value the unit gives `key` (DeviceAllow=, Environment= and others may repeat).
fn values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

/// A value with systemd's boolean spellings reduced to `yes` and `no`.
fn normal(value: &str) -> &str {
    match value {
        "true" | "on" | "1" => "yes",
        "false" | "off" | "0" => "no",
        other => other,
    }
}

/// Asserts the settings both units share: REQUIRED, PRESENT, FORBIDDEN and the ExecStart command.
fn assert_common_settings(unit: &Unit, settings: &[(String, String)]) {
    for &(key, want) in REQUIRED {
        let got = values(settings, key);
        assert!(got.iter().any(|v| normal(v) == want), "{}: {key}={want} missing (has {got:?})", unit.file);
    }
    for &key in PRESENT {
        let got = values(settings, key);
        assert!(got.iter().any(|v| !v.is_empty() && *v != "0"), "{}: {key}= missing or zero ({got:?})", unit.file);
    }
    for &(key, banned) in FORBIDDEN {
        let got = values(settings, key);
        assert!(!got.iter().any(|v| normal(v) == banned), "{}: {key}={banned} breaks the daemon", unit.file);
    }
    let exec = values(settings, "ExecStart");
    assert!(
        exec.len() == 1 && exec[0].starts_with(SERVE),
        "{}: ExecStart= should be `{SERVE} ...`, is {exec:?}",
        unit.file
    );
    let devices = values(settings, "DeviceAllow");
    assert!(devices.iter().any(|d| d.starts_with("char-nvidia-uvm")), "{}: no access to /dev/nvidia-uvm", unit.file);
}

#[test]
fn service_passes_systemd_analyze_verify() {
    assert_verifies(&SERVICE);
}

#[test]
fn template_instance_passes_systemd_analyze_verify() {
    assert_verifies(&TEMPLATE);
}

/// The verify tests would pass vacuously if the filter missed systemd's complaints: check that a
/// misspelt key and a missing binary are both caught.
#[test]
fn verify_catches_broken_units() {
    let good = with_test_binary(&unit_text(&SERVICE));
    let misspelt = verify(&SERVICE, &good.replace("WatchdogSec=", "WatchdogSecs="));
    assert!(!misspelt.success, "an unknown key passed verify:\n{}", misspelt.stderr);
    assert!(misspelt.complaints.iter().any(|l| l.contains("Unknown key")), "no complaint:\n{}", misspelt.stderr);
    let unrunnable = unit_text(&SERVICE).replace(INSTALLED_BINARY, "/nonexistent/impasto");
    let missing = verify(&SERVICE, &unrunnable);
    assert!(!missing.success, "a missing binary passed verify:\n{}", missing.stderr);
    assert!(missing.complaints.iter().any(|l| l.contains("not executable")), "no complaint:\n{}", missing.stderr);
}

#[test]
fn service_has_the_settings_the_daemon_relies_on() {
    let settings = directives(&unit_text(&SERVICE));
    assert_common_settings(&SERVICE, &settings);
    let devices = values(&settings, "DeviceAllow");
    assert!(devices.iter().any(|d| d.starts_with("char-nvidia-frontend")), "no access to the GPUs: {devices:?}");
}

/// Each instance gets its own GPU, node name and port, and may open no other GPU.
#[test]
fn template_has_the_settings_the_daemon_relies_on() {
    let settings = directives(&unit_text(&TEMPLATE));
    assert_common_settings(&TEMPLATE, &settings);
    let exec = values(&settings, "ExecStart")[0];
    assert!(exec.contains("--node %H-gpu%i") && exec.contains("--bind 127.0.0.1:810%i"), "ExecStart= {exec}");
    let devices = values(&settings, "DeviceAllow");
    assert!(devices.iter().any(|d| d.contains("%i")), "no per-instance GPU in DeviceAllow= {devices:?}");
    assert!(!devices.iter().any(|d| d.starts_with("char-nvidia-frontend")), "every GPU allowed: {devices:?}");
}

#[test]
fn sysusers_creates_the_account_the_units_run_as() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    let file = shipped("impasto.sysusers");
    let args: [&OsStr; 2] = [root_arg.as_ref(), file.as_os_str()];
    let output = systemd_tool("systemd-sysusers", &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-sysusers rejects {}:\n{stderr}", file.display());
    assert!(!stderr.contains("impasto.sysusers"), "systemd-sysusers complains:\n{stderr}");
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("impasto:")).expect("no impasto user in /etc/passwd");
    assert_eq!(user.split(':').nth(5), Some("/var/lib/impasto"), "home directory: {user}");
    let group = fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("impasto:")), "no impasto group:\n{group}");
}

#[test]
fn stream_instance_passes_systemd_analyze_verify() {
    assert_verifies(&STREAM);
}

#[test]
fn stream_unit_runs_the_stream_from_its_environment_file_and_opens_it_again_when_it_ends() {
    let settings = directives(&unit_text(&STREAM));
    let exec = values(&settings, "ExecStart");
    let wanted = "/usr/local/bin/impasto stream ${IMPASTO_STREAM_INPUT} --style ${IMPASTO_STREAM_STYLE} -o \
                  ${IMPASTO_STREAM_OUTPUT} $IMPASTO_STREAM_FLAGS";
    assert_eq!(exec, [wanted.split_whitespace().collect::<Vec<_>>().join(" ")]);
    assert_eq!(values(&settings, "EnvironmentFile"), ["/etc/impasto/stream-%i.env"]);
    // an input that ends exits 0: only `always` opens it again
    for (key, want) in [("Restart", "always"), ("RestartPreventExitStatus", "2"), ("KillMode", "mixed")] {
        assert_eq!(values(&settings, key), [want], "{key}");
    }
    let sandbox = ["User", "Group", "ProtectSystem", "ReadWritePaths", "NoNewPrivileges", "PrivateTmp", "DevicePolicy"];
    for &(key, want) in REQUIRED.iter().filter(|(key, _)| sandbox.contains(key)) {
        assert!(values(&settings, key).iter().any(|v| normal(v) == want), "{key}={want} missing");
    }
    for &(key, banned) in FORBIDDEN {
        assert!(!values(&settings, key).iter().any(|v| normal(v) == banned), "{key}={banned} breaks CUDA");
    }
}
