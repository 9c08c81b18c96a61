//! Key-package refills: keeps enough of this identity's key packages on the
//! server for others to invite it while it is offline.
//!
//! The profile is locked only while packages are generated (and their
//! private keys stored), not across the count and publish round trips.

use std::time::Duration;

use super::error::MessengerError;
use super::local::Local;
use super::supervisor::Supervisor;

/// One-time key packages published at registration and on replenishment.
pub const KEY_PACKAGE_BATCH: usize = 20;

/// Replenish when fewer one-time packages than this remain on the server.
pub const KEY_PACKAGE_LOW_WATER: u32 = 5;

/// Key-package lifetime: 28 days (RFC 9420 leaves it to the application;
/// openmls defaults to 12 weeks, we rotate sooner).
pub const KEY_PACKAGE_LIFETIME: Duration = Duration::from_secs(28 * 24 * 3600);

/// Publishes key packages when fewer than the low-water mark remain
/// (always when `force`), plus a last-resort package when none is there.
/// Returns how many the server stored.
pub(super) async fn replenish(
    link: &Supervisor,
    local: &Local,
    force: bool,
) -> Result<u32, MessengerError> {
    let client = link.client().await;
    let (count, has_last_resort) = client.key_package_count().await?;
    if !force && count >= KEY_PACKAGE_LOW_WATER && has_last_resort {
        return Ok(0);
    }
    let n = if force || count < KEY_PACKAGE_LOW_WATER {
        KEY_PACKAGE_BATCH
    } else {
        0
    };
    let packages = local
        .run(move |p| p.generate_key_packages(n, !has_last_resort, KEY_PACKAGE_LIFETIME.as_secs()))
        .await?;
    if packages.is_empty() {
        return Ok(0);
    }
    Ok(client.publish_key_packages(packages).await?)
}
