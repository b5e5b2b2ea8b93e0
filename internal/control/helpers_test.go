package control

import (
	"context"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
)

func structNew(m map[string]any) (*structpb.Struct, error) { return structpb.NewStruct(m) }

func contextWithToken(tok string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok)
}
