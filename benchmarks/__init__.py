"""The benchmark harness: natfwd against direct, kernel DNAT, HAProxy and socat in the lab topology."""
