//! Test support shared by the workspace's integration tests: the pieces
//! that were written once per crate and drifted apart. A dev-dependency
//! only.

use std::process::Command;

/// Runs `rabbitmqctl` against the machine's broker; panics with its stderr
/// when it fails (a test cannot go on without its vhost).
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates the RabbitMQ vhost `<prefix><this process's pid>` (guest may use
/// it) and returns its name. Vhosts with the same prefix whose process has
/// exited are deleted first, so crashed runs do not pile up.
///
/// Why a vhost per test process: gateways bind every slot of `feed.events`,
/// so on the shared `/` another cluster on the same exchange (a concurrent
/// test process, a dev stack) would receive and re-publish this process's
/// events, which shows up as duplicates and confusing failures.
pub fn process_vhost(prefix: &str) -> String {
    let name = format!("{prefix}{}", std::process::id());
    for old in rabbitmqctl(&["list_vhosts", "-q", "--no-table-headers", "name"]).lines() {
        let pid = old.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            // Best effort: another test process may be deleting the same one.
            let _ = Command::new("rabbitmqctl").args(["delete_vhost", old]).output();
        }
    }
    add_vhost(&name);
    name
}

/// Creates `name` and lets guest use it.
pub fn add_vhost(name: &str) {
    rabbitmqctl(&["add_vhost", name]);
    rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]);
}
