"""The chaos soak's short schedule (tests/chaos_soak.py): on hosts of their own with the team stack
(root), one training run hit by a fault of each of several kinds ends with exactly the fault-free run's
model (weights, optimizer, LR schedule, every rank's random state, bit for bit), MLflow records (each value
once, the same pictures) and evaluation figures, and nothing lost. The long schedule (every kind, 21 faults)
is run by hand and recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

import pytest

from infra.cluster import hosts as hostnet
from tests import chaos_soak
from tests.cluster_helpers import local_cluster, reachable_folder

why_not = hostnet.available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_not is not None, reason=f"chaos soak (hosts of their own): {why_not}"),
]

# A few minutes: a Train worker killed (Ray Train restarts the group), the job's driver stopped (a resubmitted
# job resumes) and the tracking database restarted (records kept and re-sent). The other kinds have drills of
# their own (test_partition_drills: a cut link; test_team_deployment: the store killed, PostgreSQL restarted;
# test_fault_tolerance: an MLflow outage); all of them together are the long schedule.
SHORT = ["kill_worker", "driver_restart", "postgres_restart"]


@pytest.fixture(scope="module")
def team_hosts(tmp_path_factory):
    with reachable_folder("soak") as state, local_cluster(
            state, num_workers=3, hosts=True, team=True, head_cpus=0, ray_env=chaos_soak.FAST_HEALTH_CHECKS
    ) as cluster:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in cluster.client_env().items():
                patch.setenv(key, value)
            patch.setenv("VAE_DATA_CACHE", str(tmp_path_factory.mktemp("submitter-cache")))
            yield cluster


def test_a_run_under_faults_ends_bitwise_equal_to_the_fault_free_run(team_hosts, tmp_path):
    report = chaos_soak.soak(team_hosts, SHORT, seed=3, workspace=tmp_path)
    print("\n" + chaos_soak.table(report))
    assert [row["fault"] for row in report["rows"]] == SHORT
    assert all(row["at_step"] != "-" for row in report["rows"]), "a fault came after the run had ended"
    findings = report["findings"]
    print({key: findings[key][:8] for key in chaos_soak.CHECKS})
    assert findings["state"] == [], findings["state"][:10]
    assert findings["metrics"] == [] and findings["metric_values"] > 0, findings["metrics"][:10]
    assert findings["pictures"] == [] and findings["pictures_compared"] > 0, findings["pictures"]
    assert findings["evaluate"] == [], findings["evaluate"]
    assert findings["lost_records"] == []
    assert report["equal"]
