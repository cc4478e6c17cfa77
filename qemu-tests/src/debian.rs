//! What the nested-Xen images (`xen`) and the Linux baseline VM
//! (`linux_fw`) take from Debian: packages fetched with `apt-get download`
//! from the machine's own apt sources and unpacked with `dpkg-deb`, the
//! stock kernel's package, and initramfs archives.

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `cmd`; its standard output, or an error with its standard error.
pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The package of Debian's stock kernel (`linux-image-amd64` depends on
/// it) and its version, e.g. (`linux-image-6.1.0-56-amd64`,
/// `6.1.0-56-amd64`).
pub(crate) fn kernel_package() -> Result<(String, String), String> {
    let pkg = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?
        .split_whitespace()
        .find(|w| w.starts_with("linux-image-6"))
        .map(str::to_string)
        .ok_or("no linux-image-6.* behind linux-image-amd64")?;
    let version = pkg.trim_start_matches("linux-image-").to_string();
    Ok((pkg, version))
}

/// Downloads each package into `debs` and unpacks it into its folder.
pub(crate) fn fetch(debs: &Path, packages: &[(&str, &Path)]) -> Result<(), String> {
    std::fs::create_dir_all(debs).map_err(|e| e.to_string())?;
    let names: Vec<&str> = packages.iter().map(|p| p.0).collect();
    run(Command::new("apt-get")
        .current_dir(debs)
        .arg("download")
        .args(&names))?;
    for (name, into) in packages {
        let prefix = format!("{name}_");
        let deb = std::fs::read_dir(debs)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .ok_or(format!("no {name} package downloaded"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into))?;
    }
    Ok(())
}

/// Packs `root` as an uncompressed newc cpio archive at `out`.
pub(crate) fn cpio(root: &Path, out: &Path) -> Result<(), String> {
    let file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(root)
        .stdout(file)
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cpio of {} failed", root.display()))
    }
}
