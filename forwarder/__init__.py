"""natfwd: reach an Amazon ElastiCache cluster from outside its VPC."""

__version__ = "0.1.0"
