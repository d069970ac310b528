//! Builds the rte_acl shim when DPDK's development files are installed (`dpdk-dev`, which
//! `scripts/deps` installs); without them the DPDK peer reports that it was not built.

use std::process::Command;

fn pkg_config(args: &[&str]) -> Option<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("libdpdk")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_dpdk)");
    println!("cargo::rerun-if-changed=dpdk/acl_shim.c");
    println!("cargo::rerun-if-env-changed=PORTCULLIS_NO_DPDK");
    if std::env::var_os("PORTCULLIS_NO_DPDK").is_some() {
        return;
    }
    let (Some(cflags), Some(libs)) = (pkg_config(&["--cflags"]), pkg_config(&["--libs"])) else {
        println!("cargo::warning=DPDK (libdpdk) not found: the rte_acl peer is not built; install dpdk-dev (scripts/deps)");
        return;
    };
    let mut b = cc::Build::new();
    b.file("dpdk/acl_shim.c").opt_level(3).warnings(false);
    for f in cflags.split_whitespace() {
        b.flag(f);
    }
    b.compile("pc_acl_shim");
    for l in libs.split_whitespace() {
        if let Some(lib) = l.strip_prefix("-l") {
            println!("cargo::rustc-link-lib={lib}");
        } else if let Some(dir) = l.strip_prefix("-L") {
            println!("cargo::rustc-link-search=native={dir}");
        }
    }
    println!("cargo::rustc-cfg=has_dpdk");
}
