//! The cluster read once (`dump`, `trace` and `services` with `--kubeconfig`): the same objects
//! the agent watches, through the same selector, converted as the agent converts them.

use crate::convert::{Converted, Rejected};

/// Reads Services, EndpointSlices and this node's Node from the cluster, once; with what could
/// not be used (whole objects, or elements left out of them), for the caller to report.
pub async fn cluster(
    client: kube::Client,
    node_name: &str,
) -> Result<(Converted, Vec<Rejected>), kube::Error> {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, ListParams};
    let mut converted = Converted::default();
    let mut problems = Vec::new();
    // kube-proxy's selector, as the agent watches (no other proxy's Services, no headless slices).
    let selected = ListParams::default().labels(super::watch::SELECTOR);
    for svc in Api::<Service>::all(client.clone()).list(&selected).await? {
        problems.extend(converted.add_service(&svc));
    }
    // A cluster older than 1.33 may not serve ServiceCIDRs: then there are none.
    match Api::<k8s_openapi::api::networking::v1::ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for obj in list {
                problems.extend(converted.add_service_cidr(&obj));
            }
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e),
    }
    for slice in Api::<EndpointSlice>::all(client.clone())
        .list(&selected)
        .await?
    {
        problems.extend(converted.add_slice(&slice));
    }
    if let Some(node) = Api::<Node>::all(client).get_opt(node_name).await? {
        problems.extend(converted.add_node(&node));
    }
    Ok((converted, problems))
}
