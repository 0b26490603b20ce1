"""The Kubernetes bridge: API objects in, the paths ``membrane apply`` feeds out."""
