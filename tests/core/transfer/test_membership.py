"""Rendezvous placement and the static member list (etcd: tests/integration/test_peers_netns.py)."""

from tierstore.cluster import Member, StaticMembership, home_node, rendezvous_order


def test_rendezvous_moves_only_the_departed_nodes_keys():
    ms = [Member(f"n{i}", "h", 1000 + i) for i in range(5)]
    keys = [i.to_bytes(32, "big") for i in range(500)]
    home = {k: home_node(k, ms).node for k in keys}
    assert len(set(home.values())) == 5
    rest = [m for m in ms if m.node != "n2"]
    for k in keys:
        h = home_node(k, rest).node
        assert h == home[k] or home[k] == "n2"
    assert rendezvous_order(keys[0], ms)[0].node == home[keys[0]]
    assert home_node(keys[0], []) is None


def test_static_membership_and_json_roundtrip():
    m = Member("a", "169.254.1.1", 7000, ("rdma", "tcp"))
    assert Member.from_json(m.to_json()) == m
    s = StaticMembership([m, Member("b", "x", 1)], self_node="a")
    assert [p.node for p in s.peers()] == ["b"]
