//! What the route source's unit tests share: a fresh table path and a route to an address.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use gpugate_routes::Route;

/// A table path in a new directory (mode 0755, as the writer wants it) named for `tag`.
pub fn table_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gpugate-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.join("routes")
}

/// A route to `up` (`address:port`).
pub fn route(up: &str) -> Route {
    Route::to(up.parse().unwrap())
}
