"""Provision and destroy the NAT instance with boto3, and discover cluster nodes (boto3 loads lazily, in client)."""
