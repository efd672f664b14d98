"""What one provision run created, kept as it goes so that a failure can remove exactly that (rollback)."""

from __future__ import annotations

from dataclasses import dataclass, field

from forwarder.aws import balancer, fleet
from forwarder.aws.inventory import Address, Bucket, Group, Instance, Inventory, Reference, Role


@dataclass
class Created:
    """What this run created, as an Inventory that destroy() can remove."""

    cluster_id: str
    groups: list[Group] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    bucket: Bucket | None = None
    role: Role | None = None
    fleet: fleet.Made = field(default_factory=fleet.Made)
    balancer: balancer.Made = field(default_factory=balancer.Made)
    balancer_groups: list[Group] = field(default_factory=list)

    def inventory(self) -> Inventory:
        made = self.balancer
        return Inventory(
            self.cluster_id,
            tuple(self.groups),
            tuple(self.instances),
            (*self.addresses, *(Address(a, ip, None, None, zone) for a, ip, zone in made.allocations)),
            tuple(self.references),
            self.bucket,
            self.role,
            scaling_groups=tuple(
                fleet.ScalingGroup(name, 0, (), "", 0, (), ()) for name in [self.fleet.group_name] if name
            ),
            templates=tuple(fleet.Template(t, t, 1, {}) for t in [self.fleet.template_id] if t),
            listeners=tuple(made.listeners),
            target_groups=tuple(made.target_groups),
            balancers=(made.balancer,) if made.balancer is not None else (),
            balancer_groups=tuple(self.balancer_groups),
        )

    def lines(self) -> list[str]:
        return self.inventory().lines()
