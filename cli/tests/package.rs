//! What ships: the Debian package (`scripts/package`) and the OCI image (`scripts/image`), built
//! from the test's own binary (the scripts take any binary; the README builds the `dist` one).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_debian_package_holds_the_unit_config_man_page_and_completions() {
    let dir = TempDir(std::env::temp_dir().join(format!("portcullis-pkg-{}", std::process::id())));
    run(Command::new("bash")
        .arg(repo().join("scripts/package"))
        .args(["--binary", env!("CARGO_BIN_EXE_portcullis"), "--out"])
        .arg(&dir.0));
    let deb = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/portcullis",
        "./usr/lib/systemd/system/portcullis.service",
        "./etc/portcullis/gateway.yaml",
        "./etc/portcullis/policies/00-example.yaml",
        "./usr/share/man/man1/portcullis.1.gz",
        "./usr/share/bash-completion/completions/portcullis",
        "./usr/share/zsh/vendor-completions/_portcullis",
        "./usr/share/fish/vendor_completions.d/portcullis.fish",
        "./usr/share/doc/portcullis/copyright",
        "./usr/share/portcullis/configs/lab/gateway.yaml",
    ] {
        assert!(contents.contains(path), "{path} missing:\n{contents}");
    }
    let control = run(Command::new("dpkg-deb").args(["--field"]).arg(&deb));
    assert!(control.contains("Depends: libc6"), "{control}");
    let conffiles = run(Command::new("dpkg-deb")
        .args(["--info"])
        .arg(&deb)
        .arg("conffiles"));
    assert!(
        conffiles.contains("/etc/portcullis/gateway.yaml"),
        "{conffiles}"
    );
    assert!(
        dir.0.join("portcullis.debug").is_file(),
        "the debug info, split off"
    );

    let root = dir.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    // The shipped binary carries no debug info, and runs.
    let sections = run(Command::new("objdump")
        .arg("-h")
        .arg(root.join("usr/bin/portcullis")));
    assert!(!sections.contains(".debug_info"), "{sections}");
    let version = run(Command::new(root.join("usr/bin/portcullis")).arg("--version"));
    assert!(version.contains("commit"), "{version}");
    // The shipped default config checks.
    run(Command::new(root.join("usr/bin/portcullis"))
        .args(["check", "--config"])
        .arg(root.join("etc/portcullis/gateway.yaml")));
    // systemd accepts the unit (its ExecStart pointed at the unpacked binary).
    if have("systemd-analyze") {
        let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/portcullis.service"))
            .unwrap()
            .replace(
                "/usr/bin/portcullis",
                root.join("usr/bin/portcullis").to_str().unwrap(),
            );
        for key in [
            "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_SYS_ADMIN CAP_IPC_LOCK CAP_SYS_RESOURCE",
            "LimitMEMLOCK=infinity",
            "Restart=on-failure",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(unit.contains(key), "{key}");
        }
        let path = dir.0.join("portcullis.service");
        std::fs::write(&path, unit).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if have("lintian") {
        let out = Command::new("lintian")
            .args(["--tag-display-limit", "0"])
            .arg(&deb)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let tags: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
            .collect();
        assert!(tags.is_empty(), "lintian: {report}");
    }
}

/// The image builds offline and holds the binary, its libraries and nothing else: no shell, no
/// package manager, under 40 MB. It runs where podman can run containers; elsewhere (this VM's
/// crun cannot set rlimits) the binary runs from the image's own root with chroot, which proves
/// the same: every library it needs is inside.
#[test]
#[ignore = "needs root and buildah (scripts/deps installs it): scripts/test runs it with --include-ignored"]
fn the_image_builds_offline_runs_and_holds_no_shell() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    assert!(
        have("buildah"),
        "buildah is missing: scripts/deps installs it"
    );
    let out = run(Command::new("bash")
        .arg(repo().join("scripts/image"))
        .args(["--binary", env!("CARGO_BIN_EXE_portcullis")]));
    let image = out.split_whitespace().next().unwrap().to_string();
    assert!(image.starts_with("localhost/portcullis:0."), "{out}");
    let inspect = run(Command::new("buildah").args(["inspect", "--type", "image", &image]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["OCIv1"]["config"]["Entrypoint"][0], "/usr/bin/portcullis");
    assert!(v["OCIv1"]["config"]["Labels"]["org.opencontainers.image.revision"].is_string());
    let ctr = run(Command::new("buildah").args(["from", &image]))
        .trim()
        .to_string();
    let mnt = PathBuf::from(run(Command::new("buildah").args(["mount", &ctr])).trim());
    let result = std::panic::catch_unwind(|| {
        for absent in [
            "bin/sh",
            "usr/bin/sh",
            "bin/bash",
            "usr/bin/apt",
            "usr/bin/dpkg",
        ] {
            assert!(!mnt.join(absent).exists(), "{absent} is in the image");
        }
        let size = dir_size(&mnt);
        eprintln!("image root: {} MB", size / 1_000_000);
        assert!(size < 40_000_000, "{size} bytes");
        let podman = have("podman")
            && Command::new("podman")
                .args(["run", "--rm", &image, "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
        let runner = |args: &[&str]| -> String {
            if podman {
                run(Command::new("podman")
                    .args(["run", "--rm", &image])
                    .args(args))
            } else {
                run(Command::new("chroot")
                    .arg(&mnt)
                    .arg("/usr/bin/portcullis")
                    .args(args))
            }
        };
        eprintln!(
            "running the image {}",
            if podman {
                "with podman"
            } else {
                "with chroot (podman cannot run containers here)"
            }
        );
        assert!(runner(&["--version"]).contains("commit"));
        let check = runner(&["check", "--config", "/etc/portcullis/lab/gateway.yaml"]);
        assert!(check.contains("compiled rules"), "{check}");
    });
    let _ = Command::new("buildah").args(["umount", &ctr]).output();
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.path().symlink_metadata().unwrap();
        if m.is_dir() {
            total += dir_size(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}
