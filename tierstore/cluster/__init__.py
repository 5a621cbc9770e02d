"""Cluster membership (static list or etcd) and home-node placement (rendezvous hashing)."""

from tierstore.cluster.membership import (EtcdMembership, Member, StaticMembership, home_node,
                                          rendezvous_order)

__all__ = ["EtcdMembership", "Member", "StaticMembership", "home_node", "rendezvous_order"]
