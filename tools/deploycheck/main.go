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

func k8s(files []string) {
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
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
			if len(bytes.TrimSpace(doc)) == 0 {
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
