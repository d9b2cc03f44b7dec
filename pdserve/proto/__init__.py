"""Generated gRPC modules for proto/pdserve.proto (package pdserve.v1).

Do not edit the generated files; change the .proto and run scripts/gen_proto.sh.
`pdserve_pb2` holds the messages, `pdserve_pb2_grpc` the Node and Router stubs and servicers.
"""
