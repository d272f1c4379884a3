//! The test's one image, built here: no registry can be reached. An OCI
//! image layout in a tar (what `ctr images import` reads) with one
//! uncompressed layer holding the host's static busybox. It serves as the
//! pod sandbox (the "pause" image: `busybox sleep infinity`, which the
//! runtime kills at StopPodSandbox) and as the client containers' image.
//! https://github.com/opencontainers/image-spec/blob/main/image-layout.md

use std::{fs, path::Path};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

const BUSYBOX: &str = "/bin/busybox";

/// Writes the image named `name` (`localhost/rulebpf/busybox:test`) to
/// `out` as an OCI layout tar.
pub fn write(name: &str, out: &Path) -> anyhow::Result<()> {
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("{BUSYBOX} (apt-get install busybox-static)"))?;
    let layer = tar_of(&[("bin/busybox", 0o755, &busybox)])?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox", "sleep", "infinity"],
            "Env": ["PATH=/bin"],
        },
        // Uncompressed: the layer's digest is its diff id.
        "rootfs": { "type": "layers", "diff_ids": [digest(&layer)] },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest(&layer),
            "size": layer.len(),
        }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            // containerd names the image after this annotation.
            "annotations": { "io.containerd.image.name": name },
        }],
    }))?;
    let blob = |bytes: &[u8]| format!("blobs/sha256/{}", &digest(bytes)["sha256:".len()..]);
    let (layer_path, config_path, manifest_path) = (blob(&layer), blob(&config), blob(&manifest));
    let archive = tar_of(&[
        ("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", 0o644, &index),
        (&manifest_path, 0o644, &manifest),
        (&config_path, 0o644, &config),
        (&layer_path, 0o644, &layer),
    ])?;
    fs::write(out, archive).with_context(|| out.display().to_string())
}

fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tar of regular files (path, mode, content), owned by root.
fn tar_of(files: &[(&str, u32, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, content) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *content)?;
    }
    Ok(builder.into_inner()?)
}
