"""The layout vocabulary every higher layer speaks: where a weight's shard sits (WeightSlot,
ShardLayout), the statistics of its inputs (InputStats), which siblings engines fuse
(fused_keys), the roles of process groups (GroupRole) and how an unquantized tensor is exported
(PassThrough). Pure descriptions: nothing here talks to torch.distributed or to a framework."""
