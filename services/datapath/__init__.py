"""The per-node datapath agent: endpoints, BPF programs and maps, flow events."""
