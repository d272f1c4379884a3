//! The pods' guard (Kubernetes, `rulebpf nri --guard`), on its own: on the
//! pods' parent cgroup it refuses the connects of pods it was not told
//! about, lets admitted pods (and their containers' cgroups) through, and
//! never runs for a pod whose own instance is attached. `cargo xtask
//! cri-test` shows it with containerd; this runs on every kernel of the
//! matrix.

use std::path::Path;

use rulebpf_loader::{
    instance,
    kernel::guard::{self, Guard},
    sys::cgroup::{Cgroup, cgroup2_mount},
};
use rulebpf_testkit::ports::GUARD_TESTS;

use crate::harness::*;

const EPERM: i32 = 1;

/// Takes the guard and its pins away whatever the test's outcome: the pin
/// directory is the host's one guard's.
struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Ok(cgroup) = Cgroup::resolve(self.0) {
            let _ = guard::remove(&cgroup);
        }
        let _ = instance::remove_guard_dir();
    }
}

#[test]
fn the_guard_refuses_pods_it_was_not_told_about_and_yields_to_an_instance() {
    let pods = TestCgroup::new("guard");
    let _cleanup = Cleanup(&pods.path);
    let server = Listener::on([127, 0, 0, 2]);
    let resolve = |p: &Path| Cgroup::resolve(p).unwrap();
    let (seen, unseen) = (pods.child("pod-seen"), pods.child("pod-unseen"));
    let container = seen.join("container");
    std::fs::create_dir_all(&container).unwrap();
    // A pod of a QoS class: two levels below (`kubepods/burstable/pod<uid>`).
    let burstable = pods.child("burstable").join("pod-burstable");
    let burstable_container = burstable.join("container");
    std::fs::create_dir_all(&burstable_container).unwrap();
    let once = |cgroup: &Path| probe_from(cgroup, server.addr, 1, &[]);
    let mut g = Guard::load(
        &instance::guard_dir().unwrap(),
        &resolve(&pods.path),
        &cgroup2_mount().unwrap(),
    )
    .unwrap();
    // Loaded, not attached yet (the plugin attaches it once the running
    // pods are admitted): nothing is refused.
    assert!(matches!(once(&unseen)[..], [Probed::Port(_)]));
    g.admit(resolve(&seen).id).unwrap();
    g.attach().unwrap();
    assert_eq!(once(&unseen), [Probed::Errno(EPERM)], "a pod not seen");
    assert_eq!(
        once(&burstable_container),
        [Probed::Errno(EPERM)],
        "a QoS-class pod not seen"
    );
    g.admit(resolve(&burstable).id).unwrap();
    assert!(
        matches!(once(&burstable_container)[..], [Probed::Port(p)] if is_os_port(p)),
        "an admitted QoS-class pod's container"
    );
    assert!(
        matches!(once(&seen)[..], [Probed::Port(p)] if is_os_port(p)),
        "an admitted pod"
    );
    assert!(
        matches!(once(&container)[..], [Probed::Port(p)] if is_os_port(p)),
        "a container cgroup of an admitted pod"
    );
    // A pod with its own instance: its hooks, not the guard's.
    let own_pod = pods.child("pod-own");
    rulebpf_ok(&[
        "attach",
        "--cgroup",
        own_pod.to_str().unwrap(),
        pods.rules_file(
            "own.ini",
            &format!("127.0.0.2 {} : {GUARD_TESTS}\n", server.port()),
        )
        .to_str()
        .unwrap(),
    ]);
    assert!(
        matches!(once(&own_pod)[..], [Probed::Port(p)] if GUARD_TESTS.contains(p)),
        "a pod with its instance gets the rule's port"
    );
    g.forget(resolve(&seen).id);
    assert_eq!(once(&seen), [Probed::Errno(EPERM)], "a forgotten pod");
    assert!(g.refused() >= 3, "refused: {}", g.refused());
    rulebpf_ok(&["detach", "--cgroup", own_pod.to_str().unwrap()]);
    assert_eq!(guard::remove(&resolve(&pods.path)).unwrap(), 2);
    assert!(
        matches!(once(&unseen)[..], [Probed::Port(_)]),
        "guard removed"
    );
    server.take(5);
}
