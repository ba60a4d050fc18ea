// Command native_authz is a zero-work ext_authz server in Go, for bench/authz_transport.py: the floor a
// compiled decision service would stand on. It answers every check at once with a prebuilt answer (the
// same content as the Python stubs there) and never reads what it is sent beyond the framing.
//
//	native_authz -mode grpc|http -answer FILE -ready FILE [-cert F -key F -ca F -peer SPIFFE_ID]
//
// gRPC: FILE holds a serialized CheckResponse, sent as is (a raw codec: no protobuf work either way).
// HTTP: FILE holds the answer's header lines ("name: value"), written on a 200 with no body.
// With -cert, the listener requires mutual TLS 1.3 and a client certificate whose one URI SAN is -peer,
// checked once per connection, as ccr's services do.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
)

// rawCodec hands the message bytes through: the server neither parses the check nor builds its answer.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                       { return "proto" }

var _ encoding.Codec = rawCodec{}

func mtls(cert, key, ca, peer string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", ca)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
		VerifyConnection: func(cs tls.ConnectionState) error {
			uris := cs.PeerCertificates[0].URIs
			if len(uris) != 1 || uris[0].String() != peer {
				return fmt.Errorf("peer %v is not %s", uris, peer)
			}
			return nil
		},
	}, nil
}

func serveGRPC(ln net.Listener, answer []byte, tlsConf *tls.Config) error {
	opts := []grpc.ServerOption{grpc.ForceServerCodec(rawCodec{})}
	if tlsConf != nil {
		tlsConf.NextProtos = []string{"h2"}
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsConf)))
	}
	s := grpc.NewServer(opts...)
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "envoy.service.auth.v3.Authorization",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Check", Handler: func(
			_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var in []byte
			if err := dec(&in); err != nil {
				return nil, err
			}
			out := answer
			return &out, nil
		}}},
	}, struct{}{})
	return s.Serve(ln)
}

func serveHTTP(ln net.Listener, answer []byte, tlsConf *tls.Config) error {
	var headers [][2]string
	for _, line := range strings.Split(strings.TrimSpace(string(answer)), "\n") {
		name, value, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			return fmt.Errorf("answer line %q is not name: value", line)
		}
		headers = append(headers, [2]string{strings.TrimSpace(name), strings.TrimSpace(value)})
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		h := w.Header()
		for _, kv := range headers {
			h[kv[0]] = []string{kv[1]} // as given: no canonicalisation work
		}
		h["Content-Length"] = []string{"0"}
		w.WriteHeader(http.StatusOK)
	})
	srv := &http.Server{Handler: handler}
	if tlsConf != nil {
		tlsConf.NextProtos = []string{"http/1.1"}
		ln = tls.NewListener(ln, tlsConf)
	}
	return srv.Serve(ln)
}

func main() {
	mode := flag.String("mode", "grpc", "grpc or http")
	answerFile := flag.String("answer", "", "the prebuilt answer")
	ready := flag.String("ready", "", "where to write {\"address\": ...} once listening")
	cert := flag.String("cert", "", "server certificate (mutual TLS when set)")
	key := flag.String("key", "", "server key")
	ca := flag.String("ca", "", "CA for client certificates")
	peer := flag.String("peer", "", "the one client SPIFFE ID accepted")
	flag.Parse()
	answer, err := os.ReadFile(*answerFile)
	if err != nil {
		log.Fatal(err)
	}
	var tlsConf *tls.Config
	if *cert != "" {
		if tlsConf, err = mtls(*cert, *key, *ca, *peer); err != nil {
			log.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	doc, _ := json.Marshal(map[string]string{"address": ln.Addr().String()})
	if err := os.WriteFile(*ready, doc, 0o600); err != nil {
		log.Fatal(err)
	}
	switch *mode {
	case "grpc":
		err = serveGRPC(ln, answer, tlsConf)
	case "http":
		err = serveHTTP(ln, answer, tlsConf)
	default:
		err = fmt.Errorf("-mode %q is not grpc or http", *mode)
	}
	log.Fatal(err)
}
