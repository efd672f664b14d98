"""The one typed wrapper over boto3 (EC2, ElastiCache, SSM, S3, IAM, STS; fleetcalls.py adds Auto Scaling and ELBv2): every AWS call natfwd makes, with errors made readable.

boto3 is imported here only, and only when a client is created, so `natfwd serve` never loads it.
Every call goes through `_call` or `_paginate` with the service and the API operation name spelled as in IAM
(`"ec2", "RunInstances"`); a test reads those pairs from this file and checks deploy/iam-provision-policy.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from forwarder.aws.fleetcalls import FleetCalls
from forwarder.errors import NatfwdError, UsageError

Tags = Sequence[tuple[str, str]]
Filters = Mapping[str, Sequence[str]]

# Error codes that mean "the caller lacks a permission" across the services natfwd calls.
_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"}


class AwsError(NatfwdError):
    """An AWS call failed; `code` is the AWS error code ("" when the call never reached AWS)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _tag_list(tags: Tags) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags]


def _filter_list(filters: Filters) -> list[dict[str, Any]]:
    return [{"Name": name, "Values": list(values)} for name, values in filters.items()]


def _tag_spec(resource_type: str, tags: Tags) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": _tag_list(tags)}]


class AwsClient(FleetCalls):
    """EC2, ElastiCache, SSM, S3, IAM, STS, Auto Scaling and ELBv2 clients for one region; methods return the API's plain dicts.

    Every method raises AwsError (a NatfwdError, exit 1) with the operation, the AWS error code and a hint.
    """

    def __init__(self, clients: Mapping[str, Any], region: str, endpoint_url: str | None, exceptions: Any) -> None:
        self._clients = dict(clients)
        self.region = region
        self.endpoint_url = endpoint_url
        self._exceptions = exceptions

    @classmethod
    def create(
        cls, region: str | None = None, profile: str | None = None, endpoint_url: str | None = None
    ) -> AwsClient:
        """Build the clients from boto3's standard credential chain.

        Raises UsageError for an unknown --profile and AwsError when no region is configured.
        """
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise NatfwdError(
                "boto3 is not installed; install natfwd with its aws extra: pip install 'natfwd[aws]'"
            ) from None
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound:
            raise UsageError(
                f"--profile: AWS profile {profile!r} is not in ~/.aws/config or ~/.aws/credentials"
            ) from None
        resolved = session.region_name
        if not resolved:
            raise AwsError("no AWS region is configured; pass --region or set AWS_DEFAULT_REGION")
        # Standard retries back off on throttling; few attempts so an unreachable endpoint fails in seconds.
        settings = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=60
        )
        clients = {
            name: session.client(name, endpoint_url=endpoint_url, config=settings)
            for name in ("ec2", "elasticache", "ssm", "s3", "iam", "sts", "autoscaling", "elbv2")
        }
        return cls(clients, resolved, endpoint_url, botocore.exceptions)

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _method(self, service: str, operation: str) -> tuple[Any, str]:
        from botocore import xform_name

        return self._clients[service], xform_name(operation)

    def _translate(self, service: str, operation: str, exc: Exception) -> AwsError:
        errors = self._exceptions
        where = f"AWS {service} {operation}"
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = str(error.get("Message", "")).strip()
            if code in _DENIED:
                hint = "the caller needs the permissions in deploy/iam-provision-policy.json"
                return AwsError(f"{where} was denied ({code}: {message}); {hint}", code)
            return AwsError(f"{where} failed: {code}: {message}", code)
        if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
            return AwsError(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "run `aws configure`, or pass --profile"
            )
        if isinstance(exc, errors.EndpointConnectionError | errors.ConnectTimeoutError | errors.ReadTimeoutError):
            target = self.endpoint_url or f"the {self.region} endpoint"
            return AwsError(f"{where}: cannot reach {target} ({exc}); check --endpoint-url, --region and the network")
        if isinstance(exc, errors.NoRegionError):
            return AwsError(f"{where}: no AWS region is configured; pass --region or set AWS_DEFAULT_REGION")
        return AwsError(f"{where} failed: {exc}")

    def _call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        client, name = self._method(service, operation)
        try:
            response: dict[str, Any] = getattr(client, name)(**params)
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._translate(service, operation, exc) from exc
        return response

    def _paginate(self, service: str, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
        client, name = self._method(service, operation)
        items: list[dict[str, Any]] = []
        try:
            for page in client.get_paginator(name).paginate(**params):
                items.extend(page.get(key, []))
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._translate(service, operation, exc) from exc
        return items

    # -- ElastiCache ------------------------------------------------------------------------------------------

    def describe_cache_cluster(self, cluster_id: str) -> dict[str, Any] | None:
        """The cache cluster with its node endpoints, or None when there is no such cache cluster."""
        try:
            found = self._call(
                "elasticache", "DescribeCacheClusters", CacheClusterId=cluster_id, ShowCacheNodeInfo=True
            )
        except AwsError as exc:
            if exc.code == "CacheClusterNotFound":
                return None
            raise
        clusters: list[dict[str, Any]] = found.get("CacheClusters", [])
        return clusters[0] if clusters else None

    def describe_replication_group(self, group_id: str) -> dict[str, Any] | None:
        """The replication group, or None when there is no such replication group."""
        try:
            found = self._call("elasticache", "DescribeReplicationGroups", ReplicationGroupId=group_id)
        except AwsError as exc:
            if exc.code == "ReplicationGroupNotFoundFault":
                return None
            raise
        groups: list[dict[str, Any]] = found.get("ReplicationGroups", [])
        return groups[0] if groups else None

    def describe_cache_subnet_group(self, name: str) -> dict[str, Any]:
        found = self._call("elasticache", "DescribeCacheSubnetGroups", CacheSubnetGroupName=name)
        groups: list[dict[str, Any]] = found["CacheSubnetGroups"]
        return groups[0]

    # -- SSM ----------------------------------------------------------------------------------------------------

    def parameter(self, name: str) -> str:
        """The value of an SSM parameter, such as the public Amazon Linux AMI parameters."""
        found = self._call("ssm", "GetParameter", Name=name)
        return str(found["Parameter"]["Value"])

    # -- EC2: network -----------------------------------------------------------------------------------------

    def describe_subnets(self, vpc_id: str) -> list[dict[str, Any]]:
        return self._paginate("ec2", "DescribeSubnets", "Subnets", Filters=_filter_list({"vpc-id": [vpc_id]}))

    def describe_route_tables(self, vpc_id: str) -> list[dict[str, Any]]:
        return self._paginate("ec2", "DescribeRouteTables", "RouteTables", Filters=_filter_list({"vpc-id": [vpc_id]}))

    # -- EC2: security groups -----------------------------------------------------------------------------------

    def describe_security_groups(self, filters: Filters) -> list[dict[str, Any]]:
        return self._paginate("ec2", "DescribeSecurityGroups", "SecurityGroups", Filters=_filter_list(filters))

    def create_security_group(self, name: str, description: str, vpc_id: str, tags: Tags) -> str:
        created = self._call(
            "ec2",
            "CreateSecurityGroup",
            GroupName=name,
            Description=description,
            VpcId=vpc_id,
            TagSpecifications=_tag_spec("security-group", tags),
        )
        return str(created["GroupId"])

    def authorize_ingress(self, group_id: str, permissions: list[dict[str, Any]], tags: Tags) -> None:
        self._call(
            "ec2",
            "AuthorizeSecurityGroupIngress",
            GroupId=group_id,
            IpPermissions=permissions,
            TagSpecifications=_tag_spec("security-group-rule", tags),
        )

    def authorize_egress(self, group_id: str, permissions: list[dict[str, Any]], tags: Tags) -> None:
        self._call(
            "ec2",
            "AuthorizeSecurityGroupEgress",
            GroupId=group_id,
            IpPermissions=permissions,
            TagSpecifications=_tag_spec("security-group-rule", tags),
        )

    def revoke_ingress(self, group_id: str, permissions: list[dict[str, Any]]) -> None:
        self._call("ec2", "RevokeSecurityGroupIngress", GroupId=group_id, IpPermissions=permissions)

    def revoke_egress(self, group_id: str, permissions: list[dict[str, Any]]) -> None:
        self._call("ec2", "RevokeSecurityGroupEgress", GroupId=group_id, IpPermissions=permissions)

    def delete_security_group(self, group_id: str) -> None:
        self._call("ec2", "DeleteSecurityGroup", GroupId=group_id)

    # -- EC2: Elastic IPs ---------------------------------------------------------------------------------------

    def describe_addresses(self, filters: Filters) -> list[dict[str, Any]]:
        found = self._call("ec2", "DescribeAddresses", Filters=_filter_list(filters))
        addresses: list[dict[str, Any]] = found.get("Addresses", [])
        return addresses

    def allocate_address(self, tags: Tags) -> tuple[str, str]:
        """Allocate an Elastic IP in the VPC domain; returns (allocation id, public IP)."""
        created = self._call("ec2", "AllocateAddress", Domain="vpc", TagSpecifications=_tag_spec("elastic-ip", tags))
        return str(created["AllocationId"]), str(created["PublicIp"])

    def associate_address(self, allocation_id: str, instance_id: str) -> str:
        """Associate the address with the instance, moving it from another instance if it has one."""
        done = self._call(
            "ec2", "AssociateAddress", AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
        )
        return str(done.get("AssociationId", ""))

    def disassociate_address(self, association_id: str) -> None:
        self._call("ec2", "DisassociateAddress", AssociationId=association_id)

    def release_address(self, allocation_id: str) -> None:
        self._call("ec2", "ReleaseAddress", AllocationId=allocation_id)

    # -- EC2: instances -----------------------------------------------------------------------------------------

    def describe_instances(self, filters: Filters) -> list[dict[str, Any]]:
        reservations = self._paginate("ec2", "DescribeInstances", "Reservations", Filters=_filter_list(filters))
        return [instance for reservation in reservations for instance in reservation.get("Instances", [])]

    def run_instance(
        self,
        *,
        image_id: str,
        instance_type: str,
        subnet_id: str,
        security_group_id: str,
        user_data: str,
        key_name: str | None,
        instance_profile: str,
        tags: Tags,
    ) -> str:
        """Launch one instance with `instance_profile`; returns its id. IMDSv2 is required, as AWS recommends."""
        params: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SubnetId": subnet_id,
            "SecurityGroupIds": [security_group_id],
            # botocore base64-encodes RunInstances UserData itself.
            "UserData": user_data,
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "IamInstanceProfile": {"Name": instance_profile},
            "TagSpecifications": _tag_spec("instance", tags) + _tag_spec("volume", tags),
        }
        if key_name:
            params["KeyName"] = key_name
        created = self._call("ec2", "RunInstances", **params)
        return str(created["Instances"][0]["InstanceId"])

    def terminate_instances(self, instance_ids: Sequence[str]) -> None:
        self._call("ec2", "TerminateInstances", InstanceIds=list(instance_ids))

    def instance_user_data(self, instance_id: str) -> str:
        """The user data an instance was launched with, decoded ("" when it has none)."""
        import base64

        found = self._call("ec2", "DescribeInstanceAttribute", InstanceId=instance_id, Attribute="userData")
        value = (found.get("UserData") or {}).get("Value")
        return base64.b64decode(value).decode("utf-8", "replace") if value else ""

    def instance_architectures(self, instance_type: str) -> list[str]:
        """The processor architectures an instance type supports ("x86_64", "arm64", ...).

        Raises UsageError when EC2 does not know the type.
        """
        try:
            found = self._call("ec2", "DescribeInstanceTypes", InstanceTypes=[instance_type])
        except AwsError as exc:
            if exc.code in ("InvalidInstanceType", "InvalidParameterValue"):
                raise UsageError(
                    f"--instance-type: {instance_type!r} is not an EC2 instance type in {self.region}; "
                    "pass one such as t4g.micro or t3.micro"
                ) from None
            raise
        types: list[dict[str, Any]] = found.get("InstanceTypes", [])
        if not types:
            raise UsageError(f"--instance-type: {instance_type!r} is not offered in {self.region}")
        return [str(a) for a in types[0].get("ProcessorInfo", {}).get("SupportedArchitectures", [])]

    # -- STS ----------------------------------------------------------------------------------------------------

    def account_id(self) -> str:
        return str(self._call("sts", "GetCallerIdentity")["Account"])

    # -- S3: the artefact bucket ----------------------------------------------------------------------------------

    def bucket_tags(self, bucket: str) -> dict[str, str] | None:
        """The bucket's tags, or None when no such bucket exists (or it is someone else's)."""
        try:
            self._call("s3", "HeadBucket", Bucket=bucket)
        except AwsError as exc:
            if exc.code in ("404", "NoSuchBucket", "403"):
                return None
            raise
        try:
            found = self._call("s3", "GetBucketTagging", Bucket=bucket)
        except AwsError as exc:
            if exc.code == "NoSuchTagSet":
                return {}
            raise
        return {str(t["Key"]): str(t["Value"]) for t in found.get("TagSet", [])}

    def create_bucket(self, bucket: str, tags: Tags) -> None:
        """A private, encrypted, tagged bucket: public access blocked, objects owned by the account, SSE-S3."""
        params: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": "BucketOwnerEnforced"}
        if self.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self._call("s3", "CreateBucket", **params)
        self._call(
            "s3",
            "PutPublicAccessBlock",
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
        self._call(
            "s3",
            "PutBucketEncryption",
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        self._call("s3", "PutBucketTagging", Bucket=bucket, Tagging={"TagSet": _tag_list(tags)})

    def put_object(self, bucket: str, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        self._call(
            "s3", "PutObject", Bucket=bucket, Key=key, Body=body, Metadata=dict(metadata), ServerSideEncryption="AES256"
        )

    def list_objects(self, bucket: str) -> list[str]:
        return [str(o["Key"]) for o in self._paginate("s3", "ListObjectsV2", "Contents", Bucket=bucket)]

    def delete_object(self, bucket: str, key: str) -> None:
        self._call("s3", "DeleteObject", Bucket=bucket, Key=key)

    def delete_bucket(self, bucket: str) -> None:
        self._call("s3", "DeleteBucket", Bucket=bucket)

    # -- IAM: the instance role and profile ------------------------------------------------------------------------

    def role_tags(self, role: str) -> dict[str, str] | None:
        """The role's tags, or None when there is no such role."""
        try:
            found = self._call("iam", "GetRole", RoleName=role)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return None
            raise
        return {str(t["Key"]): str(t["Value"]) for t in found["Role"].get("Tags") or ()}

    def create_role(self, role: str, trust_policy: str, description: str, tags: Tags) -> None:
        self._call(
            "iam",
            "CreateRole",
            RoleName=role,
            AssumeRolePolicyDocument=trust_policy,
            Description=description,
            Tags=_tag_list(tags),
        )

    def put_role_policy(self, role: str, name: str, document: str) -> None:
        self._call("iam", "PutRolePolicy", RoleName=role, PolicyName=name, PolicyDocument=document)

    def role_policy(self, role: str, name: str) -> str | None:
        """The inline policy document as JSON text, or None when the role has no such policy."""
        import json
        import urllib.parse

        try:
            found = self._call("iam", "GetRolePolicy", RoleName=role, PolicyName=name)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return None
            raise
        document = found["PolicyDocument"]
        if isinstance(document, str):  # URL-encoded JSON, as the API documents it
            return json.dumps(json.loads(urllib.parse.unquote(document)), sort_keys=True)
        return json.dumps(document, sort_keys=True)

    def role_policy_names(self, role: str) -> list[str]:
        return [str(n) for n in self._paginate("iam", "ListRolePolicies", "PolicyNames", RoleName=role)]

    def delete_role_policy(self, role: str, name: str) -> None:
        self._call("iam", "DeleteRolePolicy", RoleName=role, PolicyName=name)

    def attached_policies(self, role: str) -> list[str]:
        found = self._paginate("iam", "ListAttachedRolePolicies", "AttachedPolicies", RoleName=role)
        return [str(p["PolicyArn"]) for p in found]

    def attach_role_policy(self, role: str, policy_arn: str) -> None:
        self._call("iam", "AttachRolePolicy", RoleName=role, PolicyArn=policy_arn)

    def detach_role_policy(self, role: str, policy_arn: str) -> None:
        self._call("iam", "DetachRolePolicy", RoleName=role, PolicyArn=policy_arn)

    def delete_role(self, role: str) -> None:
        self._call("iam", "DeleteRole", RoleName=role)

    def instance_profile_roles(self, profile: str) -> list[str] | None:
        """The roles in the instance profile, or None when there is no such profile."""
        try:
            found = self._call("iam", "GetInstanceProfile", InstanceProfileName=profile)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return None
            raise
        return [str(r["RoleName"]) for r in found["InstanceProfile"].get("Roles") or ()]

    def create_instance_profile(self, profile: str, tags: Tags) -> None:
        self._call("iam", "CreateInstanceProfile", InstanceProfileName=profile, Tags=_tag_list(tags))

    def add_role_to_instance_profile(self, profile: str, role: str) -> None:
        self._call("iam", "AddRoleToInstanceProfile", InstanceProfileName=profile, RoleName=role)

    def remove_role_from_instance_profile(self, profile: str, role: str) -> None:
        self._call("iam", "RemoveRoleFromInstanceProfile", InstanceProfileName=profile, RoleName=role)

    def delete_instance_profile(self, profile: str) -> None:
        self._call("iam", "DeleteInstanceProfile", InstanceProfileName=profile)
