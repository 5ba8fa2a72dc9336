# The registrar of one host: give each host its own token with this policy, NODE replaced by
# the host's Consul node name (consul acl policy create -name registrar-NODE -rules @registrar.hcl).
#
# It registers, updates and deregisters services and their checks through the local agent
# only (the agent API acts on the agent's own node, so no other host's services can be
# touched), lists what that agent holds, and reads its own node in the catalog to confirm
# that the agent passed each change on to the servers.

# register / deregister / maintenance / check updates of the containers' services, by name
service_prefix "" {
  policy = "write"
}

# its own node: the catalog read that confirms a change reached the servers
node "NODE" {
  policy = "read"
}

# /v1/agent/self (the node name), /v1/agent/services and /v1/agent/checks of its own agent
agent "NODE" {
  policy = "read"
}
