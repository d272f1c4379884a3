//! Cleaning up the cgroups a test or a test runtime made.

use std::{fs, path::Path};

/// Removes the cgroup at `path` and its descendants, deepest first: a
/// cgroup's directory can only go once it has no child (and no process).
/// Best effort: what cannot go stays.
pub fn remove_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}
