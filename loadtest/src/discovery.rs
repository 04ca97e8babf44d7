//! Which gateways to connect to: the live members of the Redis membership
//! hash (as every publisher sees them), unless `--node` lists them.

use std::time::Duration;

use anyhow::Context;
use contract::membership;
use contract::ring::Member;

/// Redis must answer within this, or the run stops with a clear line.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateways of the run: `nodes` when given, else the members read
/// from the hash `key` at `redis_url`. Never empty.
pub async fn gateways(nodes: &[Member], redis_url: &str, key: &str) -> anyhow::Result<Vec<Member>> {
    if !nodes.is_empty() {
        return Ok(nodes.to_vec());
    }
    let client =
        redis::Client::open(redis_url).with_context(|| format!("--redis-url {redis_url:?} is not a Redis URL"))?;
    let members = tokio::time::timeout(REDIS_TIMEOUT, async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        membership::fetch(&mut conn, key).await
    })
    .await
    .map_err(|_| anyhow::anyhow!("Redis at {redis_url} did not answer within {REDIS_TIMEOUT:?}"))?
    .with_context(|| format!("cannot read the gateway membership from Redis at {redis_url}"))?;
    anyhow::ensure!(
        !members.is_empty(),
        "no gateway found: no live member in the Redis hash {key:?} at {redis_url} (start a gateway, set --membership-key, or pass --node id=ws://host:port)"
    );
    Ok(members)
}
