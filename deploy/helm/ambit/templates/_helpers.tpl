{{- define "ambit.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ambit.labels" -}}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}


{{/* The API server's address, where the cluster has no kube-proxy to route
its ClusterIP (the in-cluster config reads these two variables). */}}
{{- define "ambit.apiServerEnv" -}}
{{- if .Values.kubernetesServiceHost }}
env:
- {name: KUBERNETES_SERVICE_HOST, value: {{ .Values.kubernetesServiceHost | quote }}}
- {name: KUBERNETES_SERVICE_PORT, value: {{ .Values.kubernetesServicePort | default "443" | quote }}}
{{- end }}
{{- end -}}

{{/* Where the node proxies reach the control plane (CA and xDS): Ambit's,
or istiod when Ambit's is not installed. */}}
{{- define "ambit.xdsAddress" -}}
{{- if .Values.control.enabled -}}
{{ .Values.node.xdsAddress | default (printf "ambit-control.%s.svc:15012" .Release.Namespace) }}
{{- else -}}
{{ .Values.node.xdsAddress | default "istiod.istio-system.svc:15012" }}
{{- end -}}
{{- end -}}

{{/* The proxy's drain: the grace period less 5 s, or less 1 s at 10 s or below (ztunnel's rule). */}}
{{- define "ambit.drainSeconds" -}}
{{- $g := int .Values.node.terminationGracePeriodSeconds -}}
{{- if gt $g 10 }}{{ sub $g 5 }}{{ else }}{{ max 1 (sub $g 1) }}{{ end -}}
{{- end -}}
