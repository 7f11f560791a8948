//! Keeps the live `ip-ranges.json` current: the periodic task, the checks a fetched file must
//! pass before it replaces the set in force, the swap, and the copy on disk.
//!
//! `require_ip_ranges` against a stale file turns a new CloudFront prefix into refused users,
//! so with `[aws_ip_ranges] url` the file is fetched at start and then every `refresh`. A
//! fetched file replaces the set in force only when all of it parses, its `syncToken` is
//! newer, and every service a rule requires is still in it. Anything else keeps the set in
//! force, logged and counted (`ip_ranges_refreshes_total{result}`). Tunnels already open were
//! admitted against the old set and never look again; new CONNECTs see the new set at once.
//! Each accepted copy is written to `file` (a temporary file, then a rename), so a restart
//! without network, and a reload, start from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hyper::Uri;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::IpRanges;
use super::fetch::{self, FetchError, Fetched, Validators};
use crate::config::IpRangesRefresh;
use crate::rules::RuleSet;
use crate::state::{Runtime, Shared};

/// The `result` label values of `ip_ranges_refreshes_total`.
pub const RESULTS: [&str; 5] = ["ok", "not_modified", "error", "invalid", "stale"];

/// A refresh that kept or brought a current set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// A newer file is in force now, with this `syncToken`.
    Updated { sync: u64 },
    /// A 304, or a file with the `syncToken` already in force.
    NotModified,
}

/// A refresh that changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("no [aws_ip_ranges] url is configured")]
    NotConfigured,
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

impl RefreshError {
    /// Its `result` label (`NotConfigured` is never counted: nothing was attempted).
    pub fn result(&self) -> &'static str {
        match self {
            RefreshError::Fetch(e) if e.is_invalid() => "invalid",
            RefreshError::NotConfigured | RefreshError::Fetch(_) => "error",
            RefreshError::Rejected(Rejected::Stale { .. }) => "stale",
            RefreshError::Rejected(_) => "invalid",
        }
    }
}

/// Why a fetched file may not replace the set in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a valid ip-ranges file: {0}")]
    Invalid(String),
    #[error("service {service:?}, which rule {rule:?} requires, is not in the file")]
    MissingService { service: String, rule: String },
    #[error("syncToken {offered} is older than {current}, the one in force")]
    Stale { offered: u64, current: u64 },
}

/// What a fetched file that passed the checks is, next to the set in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Newer,
    Same,
}

/// May `candidate` replace `current` under `rules`? An equal `syncToken` is nothing new.
pub fn check(
    candidate: &IpRanges,
    current: Option<&IpRanges>,
    rules: &RuleSet,
) -> Result<Verdict, Rejected> {
    if let Some(current) = current {
        if candidate.sync < current.sync {
            return Err(Rejected::Stale {
                offered: candidate.sync,
                current: current.sync,
            });
        }
        if candidate.sync == current.sync {
            return Ok(Verdict::Same);
        }
    }
    if let Some((service, rule)) = missing_service(candidate, rules) {
        return Err(Rejected::MissingService {
            service: service.to_string(),
            rule: rule.to_string(),
        });
    }
    Ok(Verdict::Newer)
}

/// The set a freshly built config gets: the one its file held, unless the live set is newer
/// (the file on disk lags when writing it failed, or someone put an old copy back) and still
/// has every service the new rules require. A reload never goes back to an older set that way;
/// if the newer one lacks a service the new rules name, the file's set is the one they were
/// validated against, and it wins.
pub fn after_reload(
    live: Option<Arc<IpRanges>>,
    loaded: Option<Arc<IpRanges>>,
    rules: &RuleSet,
) -> Option<Arc<IpRanges>> {
    match (live, loaded) {
        (Some(live), Some(loaded)) if live.sync > loaded.sync => {
            match missing_service(&live, rules) {
                None => {
                    tracing::info!(
                        live = live.sync,
                        file = loaded.sync,
                        "reload: keeping the ip-ranges set in force, newer than the file's"
                    );
                    Some(live)
                }
                Some((service, rule)) => {
                    tracing::warn!(
                        live = live.sync,
                        file = loaded.sync,
                        service,
                        rule,
                        "reload: the ip-ranges set in force lacks a service a rule requires; \
                         going back to the file's older set"
                    );
                    Some(loaded)
                }
            }
        }
        (_, loaded) => loaded,
    }
}

fn missing_service<'a>(set: &IpRanges, rules: &'a RuleSet) -> Option<(&'a str, &'a str)> {
    rules.rules().iter().find_map(|rule| {
        rule.require_ip_ranges
            .iter()
            .find(|service| !set.has_service(service))
            .map(|service| (service.as_str(), rule.name.as_str()))
    })
}

/// The conditional-GET state: validators belong to one URL, and only to a file that was
/// accepted (sending back a rejected file's `ETag` would turn it into a 304 forever).
#[derive(Debug, Default)]
pub struct Conditional {
    url: Option<Uri>,
    validators: Option<Validators>,
}

/// One refresh now, with the config in force; logged and counted. Refreshes run one at a time.
pub async fn refresh(shared: &Shared) -> Result<Refreshed, RefreshError> {
    let mut conditional = shared.refresher.lock().await;
    let runtime = shared.runtime();
    let Some(source) = &runtime.config.ip_ranges_refresh else {
        return Err(RefreshError::NotConfigured);
    };
    if conditional.url.as_ref() != Some(&source.url.uri) {
        *conditional = Conditional {
            url: Some(source.url.uri.clone()),
            validators: None,
        };
    }
    let result = attempt(shared, &runtime, source, &mut conditional).await;
    let url = &source.url.uri;
    match &result {
        Ok(Refreshed::Updated { sync }) => {
            shared.metrics.ip_ranges_refresh("ok");
            tracing::info!(%url, sync_token = sync, "ip-ranges: a newer file is in force");
        }
        Ok(Refreshed::NotModified) => {
            shared.metrics.ip_ranges_refresh("not_modified");
            tracing::debug!(%url, "ip-ranges: unchanged");
        }
        Err(e) => {
            shared.metrics.ip_ranges_refresh(e.result());
            tracing::warn!(
                %url,
                result = e.result(),
                error = %e,
                "ip-ranges refresh failed; keeping the set in force"
            );
        }
    }
    result
}

async fn attempt(
    shared: &Shared,
    runtime: &Runtime,
    source: &IpRangesRefresh,
    conditional: &mut Conditional,
) -> Result<Refreshed, RefreshError> {
    let fetched = fetch::get(
        runtime,
        &shared.metrics,
        &source.url,
        source.tls.clone(),
        conditional.validators.as_ref(),
    )
    .await?;
    let (body, validators) = match fetched {
        Fetched::NotModified => return Ok(Refreshed::NotModified),
        Fetched::Body { body, validators } => (body, validators),
    };
    // A couple of megabytes of JSON: parsed off the event loop that also serves tunnels.
    let parsing = body.clone();
    let candidate = tokio::task::spawn_blocking(move || IpRanges::parse_bytes(&parsing))
        .await
        .map_err(|e| Rejected::Invalid(e.to_string()))?
        .map_err(Rejected::Invalid)?;
    let sync = candidate.sync;
    let verdict = {
        let writer = shared.ip_ranges_writer();
        let verdict = check(
            &candidate,
            writer.current().as_deref(),
            &writer.runtime().config.rules,
        )?;
        if verdict == Verdict::Newer {
            writer.replace(Some(Arc::new(candidate)));
        }
        verdict
    };
    conditional.validators = Some(validators);
    if verdict == Verdict::Same {
        return Ok(Refreshed::NotModified);
    }
    persist(source.file.clone(), body).await;
    Ok(Refreshed::Updated { sync })
}

/// Writes an accepted file where the next start and reload read it. A failure is logged, not
/// fatal: the new set is in force, and a reload keeps it since it is newer than the file's.
async fn persist(file: PathBuf, body: Bytes) {
    let target = file.clone();
    let written = tokio::task::spawn_blocking(move || write_atomically(&target, &body)).await;
    let error = match written {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(
        file = %file.display(),
        %error,
        "ip-ranges: cannot write the new file; a restart would read the older copy"
    );
}

/// A temporary file beside `file`, synced, then renamed over it: a crash leaves the old file
/// or the new one, never half of one.
fn write_atomically(file: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut out = std::fs::File::create(&temp)?;
        out.write_all(body)?;
        out.sync_all()?;
        std::fs::rename(&temp, file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Refreshes at start and every `refresh` while the config has a `url`; follows reloads (a new
/// url is fetched at once, a new interval counts from the last attempt). Ends on `stop`.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut installs = shared.installs();
    let mut last: Option<(Uri, Instant)> = None;
    loop {
        let due = shared
            .runtime()
            .config
            .ip_ranges_refresh
            .as_ref()
            .map(|source| match &last {
                Some((url, at)) if *url == source.url.uri => *at + source.every,
                _ => Instant::now(),
            });
        let wait = async {
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            changed = installs.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = wait => {}
        }
        let url = shared
            .runtime()
            .config
            .ip_ranges_refresh
            .as_ref()
            .map(|source| source.url.uri.clone());
        tokio::select! {
            () = stop.cancelled() => return,
            _ = refresh(&shared) => {}
        }
        last = url.map(|url| (url, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rule;
    use crate::rules::SniMode;

    fn set(sync: u64, services: &[&str]) -> IpRanges {
        let prefixes: Vec<String> = services
            .iter()
            .map(|s| format!(r#"{{"ip_prefix": "13.32.0.0/15", "service": "{s}"}}"#))
            .collect();
        IpRanges::parse(&format!(
            r#"{{"syncToken": "{sync}", "createDate": "2026-11-01-12-00-00", "prefixes": [{}]}}"#,
            prefixes.join(",")
        ))
        .unwrap()
    }

    fn rules(services: &[&str]) -> RuleSet {
        RuleSet::new(vec![Rule {
            name: "cf".into(),
            domains: vec!["*.cloudfront.net".into()],
            ports: vec![443..=443],
            private_endpoint: false,
            sni: SniMode::Enforce,
            require_ip_ranges: services.iter().map(|s| s.to_string()).collect(),
            domain_label: None,
        }])
        .unwrap()
    }

    #[test]
    fn only_a_newer_file_with_every_required_service_passes() {
        let cf = rules(&["CLOUDFRONT"]);
        let current = set(100, &["CLOUDFRONT"]);
        assert_eq!(
            check(&set(101, &["CLOUDFRONT"]), Some(&current), &cf),
            Ok(Verdict::Newer)
        );
        assert_eq!(
            check(&set(100, &["CLOUDFRONT"]), Some(&current), &cf),
            Ok(Verdict::Same)
        );
        assert_eq!(
            check(&set(99, &["CLOUDFRONT"]), Some(&current), &cf),
            Err(Rejected::Stale {
                offered: 99,
                current: 100
            })
        );
        assert_eq!(
            check(&set(101, &["AMAZON"]), Some(&current), &cf),
            Err(Rejected::MissingService {
                service: "CLOUDFRONT".into(),
                rule: "cf".into()
            })
        );
        assert_eq!(check(&set(1, &[]), None, &rules(&[])), Ok(Verdict::Newer));
    }

    #[test]
    fn a_reload_never_goes_back_to_an_older_set_it_can_do_without() {
        let cf = rules(&["CLOUDFRONT"]);
        let newer = Arc::new(set(200, &["CLOUDFRONT"]));
        let older = Arc::new(set(100, &["CLOUDFRONT", "AMAZON"]));
        let kept = after_reload(Some(newer.clone()), Some(older.clone()), &cf);
        assert_eq!(kept.unwrap().sync, 200);
        let kept = after_reload(Some(older.clone()), Some(newer.clone()), &cf);
        assert_eq!(kept.unwrap().sync, 200);
        let amazon = rules(&["AMAZON"]);
        let kept = after_reload(Some(newer.clone()), Some(older.clone()), &amazon);
        assert_eq!(kept.unwrap().sync, 100, "the newer set lacks AMAZON");
        assert!(after_reload(Some(newer), None, &rules(&[])).is_none());
    }

    #[test]
    fn writes_replace_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("portcullis-refresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ip-ranges.json");
        std::fs::write(&file, "old").unwrap();
        write_atomically(&file, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        assert!(write_atomically(&dir.join("missing/ip-ranges.json"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
