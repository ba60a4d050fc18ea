// deploycheck validates ccr's deployment files the way their own tools would read them:
// a Compose file with the Compose specification's loader (compose-go, what `docker compose`
// uses), Kubernetes manifests with the API types' strict decoder (client-go's scheme: unknown
// or misspelled fields are errors). It prints what it loaded as JSON for the tests to inspect.
//
//	deploycheck compose FILE          -> {"services": {name: {"image", "command", "depends_on"}}}
//	deploycheck k8s FILE...           -> [{"kind", "name", "containers": [{"name", "command", "args"}]}]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	"google.golang.org/protobuf/encoding/protojson"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	istioscheme "istio.io/client-go/pkg/clientset/versioned/scheme"
	sigyaml "sigs.k8s.io/yaml"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func compose(file string) {
	abs, err := filepath.Abs(file)
	if err != nil {
		fail("%v", err)
	}
	opts, err := cli.NewProjectOptions([]string{abs}, cli.WithName("ccr"), cli.WithWorkingDirectory(filepath.Dir(abs)),
		cli.WithEnv([]string{"ANTHROPIC_API_KEY=x"}))
	if err != nil {
		fail("%v", err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail("%s: %v", file, err)
	}
	out := map[string]any{}
	for name, svc := range project.Services {
		deps := []string{}
		for d := range svc.DependsOn {
			deps = append(deps, d)
		}
		var health []string
		if svc.HealthCheck != nil {
			health = []string(svc.HealthCheck.Test)
		}
		out[name] = map[string]any{"image": svc.Image, "command": []string(svc.Command), "depends_on": deps,
			"healthcheck": health, "build": svc.Build != nil, "environment": svc.Environment}
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"services": out})
}

type container struct {
	Name    string     `json:"name"`
	Command []string   `json:"command"`
	Args    []string   `json:"args"`
	Probes  [][]string `json:"probe_commands"`
	Env     []string   `json:"env"`
}

func containers(pod corev1.PodSpec) []container {
	var out []container
	for _, c := range append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...) {
		var probes [][]string
		for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
			if p != nil && p.Exec != nil {
				probes = append(probes, p.Exec.Command)
			}
		}
		var env []string
		for _, e := range c.Env {
			env = append(env, e.Name)
		}
		out = append(out, container{c.Name, c.Command, c.Args, probes, env})
	}
	return out
}

// meshConfig checks an Istio MeshConfig (the `mesh` key of the istio ConfigMap) strictly.
func meshConfig(file string, text string) int {
	js, err := sigyaml.YAMLToJSON([]byte(text))
	if err != nil {
		fail("%s: mesh: %v", file, err)
	}
	var mc meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(js, &mc); err != nil {
		fail("%s: mesh: %v", file, err)
	}
	return len(mc.ExtensionProviders)
}

func k8s(files []string) {
	full := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{scheme.AddToScheme, istioscheme.AddToScheme, egv1a1.AddToScheme} {
		if err := add(full); err != nil {
			fail("%v", err)
		}
	}
	codecs := serializer.NewCodecFactory(full, serializer.EnableStrict)
	decoder := codecs.UniversalDeserializer()
	var out []map[string]any
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			fail("%v", err)
		}
		reader := utilyaml.NewYAMLReader(bufioReader(data))
		for i := 0; ; i++ {
			doc, err := reader.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				fail("%s: document %d: %v", file, i, err)
			}
			if onlyComments(doc) {
				continue
			}
			obj, gvk, err := decoder.Decode(doc, nil, nil)
			if err != nil {
				fail("%s: document %d: %v", file, i, err)
			}
			item := map[string]any{"kind": gvk.Kind, "apiVersion": gvk.GroupVersion().String()}
			if m, ok := obj.(interface{ GetName() string }); ok {
				item["name"] = m.GetName()
			}
			if sec, ok := obj.(*corev1.Secret); ok {
				item["stringData"] = sec.StringData
			}
			if cm, ok := obj.(*corev1.ConfigMap); ok {
				if mesh, ok := cm.Data["mesh"]; ok {
					item["extensionProviders"] = meshConfig(file, mesh)
				}
			}
			switch o := obj.(type) {
			case *appsv1.Deployment:
				item["containers"] = containers(o.Spec.Template.Spec)
				item["replicas"] = o.Spec.Replicas
			case *appsv1.StatefulSet:
				item["containers"] = containers(o.Spec.Template.Spec)
			case *appsv1.DaemonSet:
				item["containers"] = containers(o.Spec.Template.Spec)
			case *batchv1.Job:
				item["containers"] = containers(o.Spec.Template.Spec)
			}
			var _ runtime.Object = obj
			out = append(out, item)
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: deploycheck compose FILE | deploycheck k8s FILE...")
	}
	switch os.Args[1] {
	case "compose":
		compose(os.Args[2])
	case "k8s":
		k8s(os.Args[2:])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}

// onlyComments: a YAML document with nothing but comments and blank lines (a file's header).
func onlyComments(doc []byte) bool {
	for _, line := range bytes.Split(doc, []byte("\n")) {
		t := bytes.TrimSpace(line)
		if len(t) > 0 && t[0] != '#' && !bytes.Equal(t, []byte("---")) {
			return false
		}
	}
	return true
}
